"""Derive the demo's second gate task, gsm8k_cloze_local, from GSM8K test (MIT, data/gsm8k/LICENSE).

SmolLM2-135M scores ~0 on gsm8k (it cannot do the arithmetic), so a gate on gsm8k alone can
never show a real decision on a CPU. This task asks what a small model can do: given a GSM8K
problem without its final sentence (the question), pick that sentence among four, the other
three being final sentences of other problems. A log-likelihood task: lm-eval scores each
choice through the same vLLM server, and a broken quantization falls to chance (0.25).
Deterministic: the same input file gives the same output bytes.

Usage: python scripts/make_cloze_task.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "gsm8k" / "test.jsonl"
TARGET = ROOT / "data" / "gsm8k" / "cloze_test.jsonl"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_last_sentence(text: str) -> tuple[str, str] | None:
    parts = SENTENCE_END.split(" ".join(text.split()))
    if len(parts) < 2:
        return None
    return " ".join(parts[:-1]), parts[-1]


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    pairs = [p for r in rows if (p := split_last_sentence(r["question"])) is not None]
    rng = random.Random(0)
    endings = [ending for _, ending in pairs]
    with TARGET.open("w") as fh:
        for i, (context, ending) in enumerate(pairs):
            others = rng.sample([e for j, e in enumerate(endings) if j != i and e != ending], 3)
            label = rng.randrange(4)
            choices = [*others[:label], ending, *others[label:]]
            fh.write(json.dumps({"context": context, "choices": choices, "label": label}) + "\n")
    print(f"wrote {len(pairs)} questions to {TARGET}")


if __name__ == "__main__":
    main()
