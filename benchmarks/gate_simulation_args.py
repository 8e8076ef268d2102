"""The arguments every gate simulation takes (the gate's file, the task's size, the baseline's
score, how many runs), so the benchmarks that simulate the gate ask for them alike."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gate_simulation_parser(description: str, runs: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path,
                        default=ROOT / "deployments" / "configs" / "production-llama3-8b.yaml")
    parser.add_argument("--questions", type=int, default=1319)
    parser.add_argument("--baseline", type=float, default=0.75)
    parser.add_argument("--runs", type=int, default=runs)
    return parser
