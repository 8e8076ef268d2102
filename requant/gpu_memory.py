"""One GPU host, three users of its memory: quantization, evaluation's vLLM servers, and the
local target's serving vLLM, which stays up between runs.

vLLM takes ``gpu_memory_utilization`` of the *whole* card at start-up and refuses to start when
that much is not free, so the shares are budgeted once, at flow start (``check_gpu_budget``):
the serving server beside an evaluation server, and two serving servers side by side during a
blue/green switch, must fit. Then each GPU user waits, with a message saying who holds the
memory and which setting to change, until what it needs is free (``wait_for_gpu_memory``):
quantization needs one layer, its Hessians and a batch (its activation cache moves to host RAM
when the GPU is short), an evaluation server its share. nvidia-smi reports free memory without
creating a CUDA context in this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from requant.errors import SettingsError

#: vLLM shares that may be committed at once: the rest is CUDA contexts and fragmentation.
BUDGET = 0.95
GIB = 2**30
BUDGET_FIX = ("rollout.local.server.gpu_memory_utilization: 0.4 and "
              "evaluation.server.gpu_memory_utilization: 0.5 fit one GPU (docs/rollout.md, "
              "GPU memory)")


def check_gpu_budget(settings: Any, on_gpu: bool) -> None:
    """At flow start, on a GPU host with the local target: the vLLM shares must fit."""
    if not on_gpu or settings.rollout.target != "local":
        return
    serve = settings.rollout.local.server.gpu_memory_utilization
    evaluate = settings.evaluation.server.gpu_memory_utilization \
        if settings.evaluation.enabled else 0.0
    problems = []
    if serve + evaluate > BUDGET:
        problems.append(f"the serving vLLM (rollout.local.server.gpu_memory_utilization={serve}) "
                        f"and an evaluation server (evaluation.server.gpu_memory_utilization="
                        f"{evaluate}) run at once: {serve + evaluate:.2f} of the GPU")
    if 2 * serve > BUDGET:
        problems.append(f"a blue/green switch runs two serving servers: 2 x {serve} of the GPU")
    if problems:
        raise SettingsError("GPU memory over-committed (at most " + f"{BUDGET} may be): "
                            + "; ".join(problems) + f". Fix: {BUDGET_FIX}.")


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first visible GPU, or None where nvidia-smi is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    done = subprocess.run([smi, "-i", index, "--query-gpu=memory.free,memory.total",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    free, total = (int(float(v)) * 2**20 for v in done.stdout.split(",")[:2])
    return free, total


def quantization_need_bytes(config: Any, batch_tokens: int) -> int:
    """What the single pass needs on the GPU when its activation cache is in host RAM: the
    largest decoder layer (bf16), its fp32 Hessians, one batch's activations, 2 GiB for the
    CUDA context and the allocator."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    hessians = (3 * hidden * hidden + inter * inter) * 4
    batch = batch_tokens * (4 * hidden + 3 * inter) * 4
    return layer + hessians + batch + 2 * GIB


def wait_for_gpu_memory(need: int, what: str, timeout_s: float, log: Callable[[str], None],
                        probe: Callable[[], tuple[int, int] | None] = gpu_memory,
                        sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until ``need`` bytes are free on the GPU; fail after ``timeout_s`` naming who can
    give them back. No GPU reading (no nvidia-smi): nothing to wait for."""
    deadline = time.monotonic() + timeout_s
    said = False
    while (reading := probe()) is not None and reading[0] < need:
        free, total = reading
        message = (f"{what} needs {need / GIB:.1f} GiB of GPU memory; {free / GIB:.1f} of "
                   f"{total / GIB:.1f} GiB are free (another run's stage, or the local "
                   "serving vLLM: rollout.local.server.gpu_memory_utilization)")
        if time.monotonic() >= deadline:
            raise SettingsError(f"{message}; waited {timeout_s:.0f} s. Fix: {BUDGET_FIX}, or "
                                "stop the other GPU user.")
        if not said:
            log(f"waiting: {message}")
            said = True
        sleep(5)
