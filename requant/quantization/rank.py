"""One calibration rank: ``torchrun ... -m requant.quantization.rank JOB.json``.

Each rank loads the model, takes its contiguous shard of the calibration set and runs the same
``quantize_model`` as a single process. With requant's single pass (the recipes it covers) the
model rests in host memory as in one process and the ranks merge each layer's statistics and
share its solves (``requant.quantization.ranks``); with llm-compressor's pipeline each rank keeps
a replica on its GPU and llm-compressor merges. After the single pass every rank holds the same
model and rank 0 saves it alone; after llm-compressor's pipeline every rank calls
``save_pretrained`` (its compression step is collective) and only rank 0 writes. A rank that
fails writes its error where the parent finds it, then fails for torchrun to see.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from requant.atomic import write_json_atomic
from requant.memory import peak_gpu_gib, peak_rss_gib
from requant.processes import die_with_parent
from requant.progress import Report, no_progress
from requant.quantization.distributed import RankJob, shard_bounds
from requant.quantization.hardware import Accelerator, detect_accelerator
from requant.quantization.memory_plan import REPLICA_BUDGET
from requant.quantization.resume import LayerStore
from requant.quantization.weights_home import model_skeleton


def main(argv: list[str] | None = None) -> int:
    job = RankJob.read(Path((argv or sys.argv[1:])[0]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    die_with_parent(signal.SIGKILL)  # torchrun gone (killed with the stage): this rank goes too
    if os.getppid() == 1:
        return 1  # torchrun died before the signal was armed
    work = Path(job.work_dir)
    (work / f"rank-{rank}.pid").write_text(str(os.getpid()))
    try:
        calibrate(job, rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    except BaseException as exc:
        write_json_atomic(work / f"rank-{rank}.error.json", {
            "type": type(exc).__name__, "message": str(exc).splitlines()[0] if str(exc) else "",
            "traceback": traceback.format_exc()})
        raise
    return 0


def calibrate(job: RankJob, rank: int, world: int, local_rank: int) -> None:
    import torch.distributed as dist

    acc = init_group(job, local_rank)
    try:
        result = calibrate_shard(job, acc, rank, world)
        if rank == 0:
            write_json_atomic(Path(job.work_dir) / "rank-0.result.json", result)
        write_json_atomic(Path(job.work_dir) / f"rank-{rank}.memory.json", {
            "rank": rank, "device": acc.torch_device, "host_rss": peak_rss_gib(),
            "gpu_allocated": peak_gpu_gib(acc.index) if acc.kind == "cuda" else None,
            "weights": result["weights"], "seconds": result["rank_seconds"]})
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_group(job: RankJob, local_rank: int) -> Accelerator:
    """NCCL with one GPU per rank, or gloo on the CPU (compressed-tensors' own ``init_dist``
    assumes an accelerator, so the group is made here)."""
    import torch
    import torch.distributed as dist

    if job.device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return dataclasses.replace(detect_accelerator("cuda"), index=local_rank)
    dist.init_process_group("gloo")
    return detect_accelerator("cpu")


def calibrate_shard(job: RankJob, acc: Accelerator, rank: int, world: int) -> dict[str, Any]:
    from datasets import load_from_disk

    from requant.quantization.oneshot import (
        compute_dtype,
        load_model,
        quantize_model,
        restore_source_dtype,
    )
    from requant.quantization.single_pass import plan, weights_read_once

    started = time.perf_counter()
    compute = compute_dtype(acc)  # every rank computes as the single process would
    single = job.pipeline == "single-pass" and plan(job.recipe_text) is not None
    skeleton = model_skeleton(Path(job.model_dir), job.trust_remote_code, compute) \
        if single and world > 1 else None
    shared = skeleton is not None and weights_read_once(skeleton, job.recipe_text)
    if shared and rank > 0:  # rank 0 reads the weights; this rank receives them layer by layer
        model, tokenizer = skeleton, None
    else:
        home = "cpu" if single else weights_device(acc, weights_bytes(Path(job.model_dir)))
        model, tokenizer = load_model(Path(job.model_dir), job.trust_remote_code, home,
                                      dtype=compute or "auto")
    data = load_from_disk(job.calibration_dir)
    loaded = time.perf_counter()
    start, end = shard_bounds(len(data), world)[rank]
    choices = quantize_model(
        model, tokenizer, job.recipe_text, data.select(range(start, end)), job.max_seq_len,
        acc, allow_tf32=job.allow_tf32,
        activation_cache=job.activation_cache,  # type: ignore[arg-type]
        smoothing_tolerance=job.smoothing_tolerance, pipeline=job.pipeline,
        store=LayerStore(Path(job.resume_dir), job.resume_inputs_every)
        if job.resume_dir else None,
        shared_weights=shared,
        report=progress_file(Path(job.work_dir)) if rank == 0 else no_progress)
    calibrated = time.perf_counter()
    choices |= restore_source_dtype(model, Path(job.model_dir), compute)
    if choices["pipeline"] == "single-pass":  # what ran (the plan may have been declined:
        # a recipe quantizing lm_head), not what the home device was chosen for
        # every rank holds the same model now: rank 0 saves it as one process does, with no
        # collective compression moving every module's state between the ranks
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            model.save_pretrained(job.save_to, save_compressed=True)
    else:
        model.save_pretrained(job.save_to, save_compressed=True)  # collective: every rank
    if rank == 0:
        tokenizer.save_pretrained(job.save_to)
    choices["weights"] = ("received from rank 0, a module at a time" if shared and rank > 0
                          else f"read from disk, sent to {world - 1} rank(s)" if shared
                          else "read from disk")
    choices["rank_seconds"] = {"load": round(loaded - started, 2),
                               "calibrate": round(calibrated - loaded, 2),
                               "save": round(time.perf_counter() - calibrated, 2)}
    return choices


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def weights_device(acc: Accelerator, model_bytes: int) -> str:
    """Where a rank keeps the weights. A full replica on each GPU when it fits (llm-compressor's
    device cache, its tested distributed path; 16 GiB for an 8B model in bf16: measured). Else
    one copy in host memory shared by all ranks, one layer at a time on each GPU, exact through
    requant.quantization.rank_safe (proven on CPU ranks; not yet timed on GPUs)."""
    if acc.kind == "cuda" and acc.memory_gib and model_bytes <= REPLICA_BUDGET * acc.memory_gib \
            * 2**30:
        return acc.torch_device
    return "cpu"


def progress_file(work: Path, min_interval_s: float = 1.0) -> Report:
    """Rank 0's progress, for the parent to forward to the stage's progress bar."""
    last = [0.0]

    def report(fraction: float, message: str) -> None:
        if time.monotonic() - last[0] >= min_interval_s:
            last[0] = time.monotonic()
            write_json_atomic(work / "progress.json", {"fraction": fraction, "message": message})
    return report


if __name__ == "__main__":
    sys.exit(main())
