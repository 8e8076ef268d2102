"""Data-parallel calibration (``quantization.gpus`` > 1): the parent's side.

The stage launches ``torchrun --nproc-per-node N -m requant.quantization.rank JOB`` (one
process per GPU, NCCL; gloo on the CPU) and stays the owner of everything that must be atomic:
rank 0 saves into a directory the parent created inside its ``atomic_directory``, and the parent
verifies and writes the manifest, so a failed or killed rank leaves no checkpoint.

What llm-compressor (>= 0.11) does across ranks, and why the result is the same checkpoint:
SmoothQuant all-reduces per-channel min/max (order-free, so the scales are exactly those of one
process), GPTQ sums each Linear's Hessian across ranks and solves each Linear on one rank, then
broadcasts the result. Only the Hessian sum's floating-point order differs from one process.

No process outlives the stage: torchrun runs in its own session with the parent-death signal;
each rank (a session of its own, as torchrun starts them) sets the signal against torchrun and
writes its pid, and the parent stops every one of them on the way out, whatever the outcome.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from requant.atomic import write_json_atomic
from requant.errors import QuantizationFailed, SettingsError
from requant.processes import die_with_parent, pid_running, stop_process_group
from requant.progress import Report, no_progress


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs, as plain JSON: ranks import no Prefect and no settings model."""

    model_dir: str
    calibration_dir: str
    recipe_text: str
    max_seq_len: int
    device: str  # "cuda" or "cpu"
    world: int
    save_to: str
    work_dir: str
    trust_remote_code: bool = False
    allow_tf32: bool = True
    activation_cache: str = "auto"
    smoothing_tolerance: float | None = None
    pipeline: str = "single-pass"
    resume_dir: str | None = None  # quantization.resume: the finished layers' store
    resume_inputs_every: int = 0  # quantization.resume_inputs_every (kept with one rank only)

    def write(self) -> Path:
        return write_json_atomic(Path(self.work_dir) / "job.json", asdict(self))

    @classmethod
    def read(cls, path: Path) -> RankJob:
        return cls(**json.loads(Path(path).read_text()))


def shard_bounds(num_samples: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards of the (already seeded-shuffled) calibration set, sizes differing by at
    most one: the same rule as llm-compressor's own partitioning, written down so the manifest can
    record exactly which samples each rank saw."""
    return [(math.floor(num_samples * r / world), math.floor(num_samples * (r + 1) / world))
            for r in range(world)]


def check_rank_inputs(world: int, samples: int | None) -> None:
    """Ranks split the calibration set: there must be one (``samples`` None: the recipe uses
    none) with at least a sample per rank. Preflight asks with the setting, the stage with the
    prepared set's count."""
    if world <= 1:
        return
    if samples is None:
        raise SettingsError("quantization.gpus > 1 splits the calibration set across GPUs, "
                            "and this recipe uses none: set quantization.gpus=1.")
    if samples < world:
        raise SettingsError(
            f"quantization.gpus={world} needs at least {world} calibration samples (one per "
            f"rank); calibration.num_samples gives {samples}. Raise calibration.num_samples "
            "or lower quantization.gpus."
        )


def torchrun_command(job_file: Path, world: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", "--max-restarts=0", f"--log-dir={log_dir}",
            "--redirects=3", "--tee=3", "-m", "requant.quantization.rank", str(job_file)]


def rank_env(world: int) -> dict[str, str]:
    """torchrun would pin every rank to one CPU thread: give each its share of the cores. The
    ranks import requant from the same tree as this process, wherever the worker's cwd is."""
    threads = max(1, (os.cpu_count() or 1) // world)
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": path}


def run_ranks(job: RankJob, report: Report = no_progress) -> dict[str, Any]:
    """Run the ranks to the end; returns rank 0's result plus every rank's peak memory.

    Raises QuantizationFailed naming the first rank that failed (its own error when it could
    write one, else how it ended: killed by a signal, or an exit code, and its log's tail).
    """
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    job_file = job.write()
    log_path = work / "torchrun.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            torchrun_command(job_file, job.world, work / "logs"), env=rank_env(job.world),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),
        )
    try:
        code = _wait(proc, work, report)
    finally:
        stop_everything(proc, work, job.world)
    if code != 0:
        raise rank_failure(work, job.world, code)
    return collect_results(work, job.world)


def _wait(proc: subprocess.Popen, work: Path, report: Report) -> int:
    """Forward rank 0's progress until torchrun ends; its exit code."""
    progress = work / "progress.json"
    while (code := proc.poll()) is None:
        if progress.exists():
            try:
                p = json.loads(progress.read_text())
                report(p["fraction"], p["message"])
            except (OSError, ValueError, KeyError):
                pass  # rank 0 replaces it atomically; a read can still race a first write
        time.sleep(1.0)
    return code


def stop_everything(proc: subprocess.Popen, work: Path, world: int) -> None:
    """torchrun and each rank (a session leader of its own): stopped and gone before return."""
    if proc.poll() is None:
        stop_process_group(proc.pid, grace_s=10)
    proc.wait()
    for rank in range(world):
        pid = _rank_pid(work, rank)
        if pid is not None and pid_running(pid):
            stop_process_group(pid, grace_s=5)


def _rank_pid(work: Path, rank: int) -> int | None:
    try:
        return int((work / f"rank-{rank}.pid").read_text())
    except (OSError, ValueError):
        return None


_EXIT = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def rank_failure(work: Path, world: int, code: int) -> QuantizationFailed:
    """The first rank that failed, as torchrun observed it (the others often fail after it, of
    a closed connection), with its own error when it could write one, else how it ended."""
    text = (work / "torchrun.log").read_text(errors="replace")
    root = _EXIT.search(text.rsplit("Root Cause", 1)[-1])
    ranks = [int(root.group(1))] if root else list(range(world))
    for rank in ranks:
        err = work / f"rank-{rank}.error.json"
        if err.exists():
            e = json.loads(err.read_text())
            return QuantizationFailed(
                f"calibration rank {rank} of {world} failed: {e['type']}: {e['message']}; every "
                f"other rank was stopped and nothing was written (its log: "
                f"{_rank_log(work, rank) or work / 'torchrun.log'})", rank)
    if root:
        rank, exit_code = int(root.group(1)), int(root.group(2))
        how = (f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0
               else f"exited with code {exit_code}")
        log = _rank_log(work, rank)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log else ""
        return QuantizationFailed(
            f"calibration rank {rank} of {world} {how}; every other rank was stopped and "
            f"nothing was written.\n{tail}".rstrip(), rank)
    tail = "\n".join(text.splitlines()[-25:])
    return QuantizationFailed(f"torchrun exited with code {code}; nothing was written.\n{tail}")


def _rank_log(work: Path, rank: int) -> Path | None:
    logs = sorted((work / "logs").glob(f"**/attempt_*/{rank}/stderr.log"))
    return logs[-1] if logs else None


def collect_results(work: Path, world: int) -> dict[str, Any]:
    result = json.loads((work / "rank-0.result.json").read_text())
    result["ranks"] = [json.loads((work / f"rank-{r}.memory.json").read_text())
                       for r in range(world)]
    return result

