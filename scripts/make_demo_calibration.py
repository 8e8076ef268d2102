"""Derive the demo's chat-format calibration file from GSM8K train (MIT, see data/gsm8k/LICENSE).

Each problem becomes a two-turn conversation (user: question, assistant: worked answer), the
format of the production set (ultrachat_200k), so the demo exercises the chat-template path.
Deterministic: the same input file gives the same output bytes.

Usage: python scripts/make_demo_calibration.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "gsm8k" / "train.jsonl"
TARGET = ROOT / "data" / "calibration" / "gsm8k-chat-1k.jsonl"
ROWS = 1000


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with TARGET.open("w") as fh:
        for row in rows[:ROWS]:
            messages = [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]},
            ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {ROWS} chat rows to {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
