"""End-to-end smoke against a running server: adapter miss then hit, /generate, the OpenAI client.

    .venv/bin/python bench/smoke.py --url http://127.0.0.1:8000

Prints one JSON line (what each call answered and its server-side time); exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    task = {"instruction": f"Answer with the antonym of the given word. smoke {uuid.uuid4().hex[:8]}",
            "demos": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}
    checks: dict[str, object] = {}
    with httpx.Client(base_url=args.url, timeout=120) as client:
        miss = client.post("/adapters", json=task)
        hit = client.post("/adapters", json=task)
        adapter_id = miss.json()["adapter_id"]
        checks["adapter_miss"] = {"status": miss.status_code, "cached": miss.json().get("cached"), "server_timing": miss.headers.get("server-timing")}
        checks["adapter_hit"] = {"status": hit.status_code, "cached": hit.json().get("cached"), "server_timing": hit.headers.get("server-timing")}
        answer = client.post("/generate", json={"input": "big", "adapter_id": adapter_id, "max_tokens": 8})
        checks["generate"] = {"status": answer.status_code, "text": answer.json().get("text")}
    from openai import OpenAI

    openai = OpenAI(base_url=f"{args.url}/v1", api_key="none")
    chat = openai.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "big"}], max_tokens=8)
    checks["openai_chat"] = {"model": chat.model, "text": chat.choices[0].message.content}
    ok = (miss.status_code in (200, 201) and hit.json().get("cached") is True and answer.status_code == 200
          and bool(chat.choices[0].message.content))
    print(json.dumps({"ok": ok, **checks}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
