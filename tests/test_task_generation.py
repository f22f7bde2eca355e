"""Task-aware generation with the shipped checkpoint: send a task and its inputs, get the answers.

A server of its own (vLLM CPU engine, the default checkpoint as a user gets it), over HTTP.
"""
from __future__ import annotations

import pytest

from launcher import ServerProcess

pytestmark = pytest.mark.vllm

SENTIMENT = {
    "instruction": "Classify the sentiment of the movie review as positive or negative.",
    "demos": [
        {"input": "A wonderful, moving film with superb acting.", "output": "positive"},
        {"input": "Boring and far too long; I walked out.", "output": "negative"},
        {"input": "The best thing I have seen this year.", "output": "positive"},
    ],
}
REVIEWS = {
    "An absolute delight from start to finish.": "positive",
    "Terrible script and wooden acting.": "negative",
    "I loved every minute of it.": "positive",
    "A waste of two hours.": "negative",
    "Beautifully shot and deeply moving.": "positive",
    "The plot made no sense and the jokes fell flat.": "negative",
}
ANTONYMS = {
    "instruction": "Answer with the antonym of the given word.",
    "demos": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
}
OPPOSITES = {"fast": "slow", "light": "dark", "open": "closed", "tall": "short"}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("shipped"), {"HYPERGEN_CHECKPOINT": "default", "HYPERGEN_ENGINE": "vllm"}, "shipped")
    server.wait_ready()
    with server.client() as client:
        yield client
    server.stop()


def answers(client, task: dict, inputs: list[str], **extra) -> list[str]:
    response = client.post("/generate", json={"task": task, "inputs": inputs, "max_tokens": 8, **extra})
    assert response.status_code == 200, response.text
    return [r["text"].strip() for r in response.json()["results"]]


def test_sentiment_inputs_get_the_demos_labels(shipped):
    got = answers(shipped, SENTIMENT, list(REVIEWS))
    assert all(a in ("positive", "negative") for a in got), got  # every answer is one of the labels
    assert sum(a == want for a, want in zip(got, REVIEWS.values())) >= 5, got
    base = answers(shipped, SENTIMENT, list(REVIEWS), use_adapter=False)  # same prompt, no adapter
    assert sum(a in ("positive", "negative") for a in base) < len(REVIEWS), base
    correct = sum(a == want for a, want in zip(got, REVIEWS.values()))
    assert correct > sum(a.lower() == want for a, want in zip(base, REVIEWS.values())), (got, base)  # it helps


def test_antonyms(shipped):
    got = answers(shipped, ANTONYMS, list(OPPOSITES))
    assert sum(a.lower() == want for a, want in zip(got, OPPOSITES.values())) >= 3, got
