"""One directory per run, one sub-directory per stage, so a person can read what happened."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Written in every run folder when it is made: `requant runs prune` and `requant status` take
#: only folders that carry it, never anything else that sits in output_dir.
MARKER = ".requant-run"

STAGES = ("calibration", "checkpoint", "eval", "gate", "publish", "rollout", "candidates",
          "throughput")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, output_dir: Path, run_id: str) -> RunDir:
        root = Path(output_dir).resolve() / run_id
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text(f"{run_id}\n")
        return cls(root)

    def stage(self, name: str) -> Path:
        """Path of a stage's output; the stage writes it atomically, so it is not created here."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        return self.root / name
