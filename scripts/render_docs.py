"""Write the parts of docs/ that are generated from the code: docs/trust.md's table of who
chooses what (requant/trust_table.py). Run: .venvs/pipeline/bin/python scripts/render_docs.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    head, found, rest = text.partition(begin)
    if not found:
        raise SystemExit(f"marker {begin!r} not found")
    _, found, tail = rest.partition(end)
    if not found:
        raise SystemExit(f"marker {end!r} not found")
    return head + block + tail


def rendered() -> dict[Path, str]:
    from requant import trust_table

    trust = ROOT / "docs" / "trust.md"
    return {trust: replace_between(trust.read_text(), trust_table.BEGIN, trust_table.END,
                                   trust_table.render())}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path, text in rendered().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
