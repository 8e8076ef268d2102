"""Calibration stage: build (or reuse) the calibration set and show its statistics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from requant.atomic import atomic_directory, write_json_atomic
from requant.calibration import CalibrationSet, build_calibration_set
from requant.settings import CalibrationSettings
from requant.source import ResolvedSource


# the flow logs prints; not here, where library code prints to a captured stdout
# (docs/architecture.md, "Prints and the run log")
@task(name="prepare-calibration", log_prints=False)
def prepare_calibration(
    cfg: CalibrationSettings, source: ResolvedSource, cache_dir: Path, out_dir: Path
) -> CalibrationSet:
    """Record the set in the run's calibration/ folder: what a run calibrated on is evidence."""
    logger = get_run_logger()
    calib = build_calibration_set(cfg, source, cache_dir)
    s = calib.stats
    logger.info(
        "calibration set %s (%s rows, %s): %d samples, %d tokens, p50 %d / max %d, %d truncated",
        calib.fingerprint[:12], calib.row_format, "reused from cache" if calib.reused else "built",
        s.samples, s.total_tokens, s.p50_len, s.max_len, s.truncated,
    )
    with atomic_directory(out_dir) as tmp:
        write_json_atomic(tmp / "calibration.json", {**calib.as_record(),
                                                      "cache_path": str(calib.path),
                                                      "reused": calib.reused})
    create_table_artifact(
        key="calibration-stats",
        table=[{"statistic": k, "value": v} for k, v in asdict(s).items()]
        + [{"statistic": "fingerprint", "value": calib.fingerprint[:16]},
           {"statistic": "reused from cache", "value": calib.reused}],
        description=f"Calibration set from {cfg.dataset} ({calib.row_format} rows), "
        f"max_seq_len {cfg.max_seq_len}, seed {cfg.seed}.",
    )
    return calib
