"""The runs a pipeline left behind: listing them for ``requant status`` and pruning them.

Run folders (with their checkpoints, rejected ones included), fetched Hub releases and the
calibration / baseline caches grow with every nightly run. Pruning never deletes what a target
serves (or would roll back to), nor the run that was last published: those are the evidence a
person needs when production misbehaves.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.atomic import read_json
from requant.errors import SettingsError
from requant.quantization.resume import RESUME_DIR
from requant.rollout.state import load_state
from requant.rundir import MARKER
from requant.settings import PipelineSettings

TARGETS = ("local", "kubernetes")
#: Cache folders whose entries ``runs prune --older-than`` may delete (a killed quantization's
#: kept layers included: a rerun of the same inputs within the age still resumes from them).
CACHE_FOLDERS = ("calibration", "baseline-eval", "releases", RESUME_DIR)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    path: Path
    mtime: float
    summary: dict[str, Any] | None  # None: the run ended before writing summary.json


def list_runs(output_dir: Path) -> list[RunRecord]:
    """Newest first: the folders requant made for runs (they carry ``rundir.MARKER``); one
    without summary.json is listed too (it failed or runs now)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    runs = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith(".") or not (path / MARKER).is_file():
            continue
        summary_file = path / "summary.json"
        try:
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        except (OSError, json.JSONDecodeError):
            summary = None
        runs.append(RunRecord(path.name, path.resolve(), path.stat().st_mtime, summary))
    return sorted(runs, key=lambda r: r.mtime, reverse=True)


def protected_paths(settings: PipelineSettings) -> set[Path]:
    """What serves (active, previous: the rollback target, pending) and the last published run."""
    keep: set[Path] = set()
    for target in TARGETS:
        state = load_state(settings.rollout.state_dir, target)
        for d in (state.active, state.previous, state.pending):
            if d is not None and d.release.checkpoint:
                keep.add(Path(d.release.checkpoint).resolve())
    last = last_published(settings.cache_dir)
    if last and last.get("checkpoint"):
        keep.add(Path(last["checkpoint"]).resolve())
    return keep


def last_published(cache_dir: Path) -> dict[str, Any] | None:
    ledger = Path(cache_dir) / "ledger"
    fix = "Delete it: a ledger record that cannot be read cannot be trusted."
    records = [read_json(p, fix) for p in ledger.glob("*.json")] if ledger.is_dir() else []
    return max((r for r in records if r and r.get("published_at")),
               key=lambda r: r["published_at"], default=None)


def _holds(folder: Path, keep: set[Path]) -> bool:
    folder = folder.resolve()
    return any(folder == k or folder in k.parents for k in keep)


def prune_candidates(settings: PipelineSettings, keep_last: int | None,
                     older_than_s: float | None, now: float | None = None) -> list[Path]:
    """Folders to delete: runs beyond the newest ``keep_last`` and/or older than the cutoff,
    plus cache entries older than the cutoff; never a protected one."""
    if keep_last is None and older_than_s is None:
        raise SettingsError("runs prune: give --keep N or --older-than D (e.g. 14d), or both.")
    if keep_last is not None and keep_last < 0:
        raise SettingsError("runs prune --keep: must be 0 or more.")
    now = time.time() if now is None else now
    keep = protected_paths(settings)
    doomed = []
    for i, run in enumerate(list_runs(settings.output_dir)):
        beyond = keep_last is not None and i >= keep_last
        old = older_than_s is not None and now - run.mtime > older_than_s
        if (beyond or (keep_last is None and old)) and not _holds(run.path, keep):
            doomed.append(run.path)
    if older_than_s is not None:
        for name in CACHE_FOLDERS:
            folder = Path(settings.cache_dir) / name
            for entry in sorted(folder.glob("*/*" if name == "releases" else "*")):
                if entry.is_dir() and now - entry.stat().st_mtime > older_than_s \
                        and not _holds(entry, keep):
                    doomed.append(entry.resolve())
    return doomed


def delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def parse_age(text: str) -> float:
    """'14d', '12h', '30m' or seconds -> seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    raw = text.strip().lower()
    try:
        if raw and raw[-1] in units:
            return float(raw[:-1]) * units[raw[-1]]
        return float(raw)
    except ValueError:
        raise SettingsError(f"--older-than {text!r}: expected a duration such as 14d, 12h or "
                            "30m.") from None
