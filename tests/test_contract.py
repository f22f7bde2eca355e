"""Contract fuzzing: schemathesis generates requests from the server's own /openapi.json and runs
all its checks against the real server over HTTP: no server error, no undocumented status or
content type, responses match their schemas, schema-valid requests are accepted and invalid ones
rejected, auth is honoured. Bounded (15 examples per operation per phase), deterministic.

Two servers: without API keys (vLLM engine) and with keys (transformers engine, fuzzed with the
key and without it), each with max_tokens bounded at 8 so generated requests stay quick.
``tests/schemathesis.toml`` accepts 413 for schema-valid requests: a prompt can exceed a limit
counted in tokens, which JSON Schema cannot express; ``tests/contract_checks.py`` checks that a
413 never means anything else.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import ServerProcess

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
KEY = "contract-test-key"


def schemathesis_run(url: str, workdir: Path, *headers: str) -> subprocess.CompletedProcess:
    """``st run`` with every check; it keeps a crash cache in its working directory, so not the repo."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (it is in the dev extra)")
    command = [
        st, "--config-file", str(ROOT / "tests/schemathesis.toml"), "run", f"{url}/openapi.json",
        "--checks", "all", "--max-examples", "15", "--workers", "1", "--request-timeout", "120", "--no-shrink",
    ]
    for header in headers:
        command += ["--header", header]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.contract_checks", "NO_COLOR": "1"}
    return subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=900)


def assert_clean(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    assert " passed" in run.stdout and "generated" in run.stdout, run.stdout[-2_000:]


def fuzz_server(server_env: dict[str, str], tmp_path_factory, engine: str, **extra: str) -> ServerProcess:
    # The stateful phase starts refine jobs on adapters it made: they queue (one trains at a time)
    # rather than answer 503, which the fuzzer would count as a server error.
    env = {**server_env, "HYPERGEN_ENGINE": engine, "HYPERGEN_MAX_TOKENS_LIMIT": "8", "HYPERGEN_MAX_QUEUED_JOBS": "100000", **extra}
    return ServerProcess(tmp_path_factory.mktemp("fuzz"), env, f"fuzz-{engine}").wait_ready()


def test_contract_without_api_keys(server_env, tmp_path_factory, tmp_path):
    server = fuzz_server(server_env, tmp_path_factory, "vllm")
    try:
        assert_clean(schemathesis_run(server.url, tmp_path))
        assert "Traceback" not in server.log()  # nothing failed inside either
    finally:
        server.stop()


def test_contract_with_api_keys(server_env, tmp_path_factory, tmp_path):
    server = fuzz_server(server_env, tmp_path_factory, "hf", HYPERGEN_API_KEYS=f'["{KEY}"]')
    try:
        assert_clean(schemathesis_run(server.url, tmp_path, f"Authorization: Bearer {KEY}"))
        anonymous = schemathesis_run(server.url, tmp_path)  # every routed call must answer 401, as documented
        assert_clean(anonymous)
        assert "returned only 401" in anonymous.stdout
        assert "Traceback" not in server.log()
    finally:
        server.stop()
