"""Where a training run's step time went, from its log: rows/s and the share of each phase.

    .venv/bin/python bench/train_profile.py runs/smollm2-default/log.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("t_hyper", "t_forward", "t_backward", "t_optim")


def main(path: str) -> None:
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record  # a resumed run logs its replayed steps again: keep the last
    records = [r for _, r in sorted(by_step.items()) if "rows" in r]
    if not records:
        sys.exit(f"{path}: no supervised steps with timings")
    total = sum(r["seconds"] for r in records)
    rows = sum(r["rows"] for r in records)
    real = sum(r["tokens"] for r in records)
    padded = sum(r["padded_tokens"] for r in records)
    print(f"{len(records)} steps, {rows} rows in {total / 60:.1f} min of step time: {rows / total:.2f} rows/s, "
          f"{total / len(records):.2f} s/step (median {sorted(r['seconds'] for r in records)[len(records) // 2]:.2f})")
    print(f"tokens: {real} real of {padded} in batches ({100 * real / padded:.0f}% not padding)")
    for phase in PHASES:
        spent = sum(r.get(phase, 0.0) for r in records)
        print(f"  {phase:<11} {100 * spent / total:5.1f}%  ({spent / len(records):.2f} s/step)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-default/log.jsonl")
