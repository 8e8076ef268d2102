"""Quantizing a loaded model: the pipeline registry (requant's single pass for the recipes it
covers, else llm-compressor's oneshot) and the choices around it, kept free of Prefect so a bare
GPU box can run and time it.

Choices made here, each measured (docs/quantization.md):
- TF32 matmuls on NVIDIA GPUs: GPTQ's Hessians are accumulated as X^T X in fp32, the biggest
  calibration cost after the forward passes; TF32 runs them on tensor cores.
- Intermediate activations stay on the GPU when they fit: llm-compressor's sequential pipeline
  otherwise offloads every layer's inputs to host memory and back, twice per layer per modifier.
- Our own seeded shuffle: oneshot's is unseeded, which would make equal inputs calibrate in a
  different order on each run.
- SmoothQuant runs as its own oneshot call (requant.quantization.rank_safe's modifier: the same
  as llm-compressor's unless several ranks share one copy of the weights), then every decoder
  layer is checked to compute what it did before (requant.quantization.smoothing), then the rest
  of the recipe. llm-compressor's default pipeline already gives each modifier its own
  calibration pass, so the split costs no compute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from requant.progress import Report, no_progress
from requant.quantization.hardware import Accelerator
from requant.quantization.progress import calibration_passes, layer_progress
from requant.quantization.ranks import Ranks
from requant.quantization.resume import LayerStore
from requant.quantization.single_pass import (
    BATCH_TOKENS,
    outside_layers,
    plan,
    quantize_single_pass,
)
from requant.quantization.smoothing import (
    ARCHITECTURES,
    Architecture,
    check_smoothing,
    first_layer_balance,
    plain_norms,
    probe,
    split_recipe,
    tolerances,
)

ActivationCache = Literal["auto", "gpu", "cpu"]
#: Share of free GPU memory the activation cache may take when it is kept on the GPU.
GPU_CACHE_BUDGET = 0.5


def activation_cache_device(
    setting: ActivationCache, acc: Accelerator, cache_bytes: int, free_gpu_bytes: int | None
) -> str:
    """Where the sequential pipeline keeps the activations between layers."""
    if acc.kind != "cuda" or setting == "cpu":
        return "cpu"
    if setting == "gpu":
        return acc.torch_device
    if free_gpu_bytes is not None and cache_bytes <= GPU_CACHE_BUDGET * free_gpu_bytes:
        return acc.torch_device
    return "cpu"


def estimate_cache_bytes(total_tokens: int, hidden_size: int, dtype_bytes: int = 2) -> int:
    """One hidden-state tensor per calibration token, as cached between two decoder layers."""
    return total_tokens * hidden_size * dtype_bytes


def load_model(model_dir: Path, trust_remote_code: bool = False, device: str = "cpu",
               dtype: Any = "auto"):
    """On the CPU by default: the sequential pipeline moves one layer at a time onto the GPU.
    Calibration ranks load onto their own GPU instead (requant.quantization.rank). ``dtype``:
    the checkpoint's own ("auto"), or what calibration computes in (``compute_dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
        **({"device_map": device} if device != "cpu" else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer


def compute_dtype(acc: Accelerator) -> Any:
    """torch.float32 when calibrating on a CPU without native bf16 (a bf16 Linear there ran 7x
    slower than fp32: docs/quantization.md); None keeps the checkpoint's dtype."""
    import torch

    from requant.quantization.hardware import cpu_has_native_bf16

    return torch.float32 if acc.kind == "cpu" and not cpu_has_native_bf16() else None


def restore_source_dtype(model: Any, model_dir: Path, compute: Any) -> dict[str, Any]:
    """After calibrating in ``compute`` (fp32 on a CPU without native bf16), the model goes back
    to the dtype its source declares, so the checkpoint is the one a bf16 machine would save.
    Returns the manifest's record of it (nothing when the source's dtype was used)."""
    import torch

    if compute is None:
        return {}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    saved = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    if isinstance(saved, torch.dtype) and saved != compute:
        model.to(saved)
        model.config.dtype = saved
    return {"compute_dtype": str(compute).removeprefix("torch.")}


@dataclass(frozen=True)
class QuantizeJob:
    """One model to quantize in place, and how (``quantize_model``'s arguments, typed).

    ``model.config.name_or_path`` must be a directory holding the config: oneshot re-reads it.
    ``shared_weights`` (ranks, single pass only): ranks other than 0 hold a skeleton and receive
    the weights from rank 0 (``requant.quantization.weights_home``)."""

    model: Any
    tokenizer: Any
    recipe_text: str
    dataset: Any
    max_seq_len: int
    acc: Accelerator
    allow_tf32: bool = True
    activation_cache: ActivationCache = "auto"
    smoothing_tolerance: float | None = None
    pipeline: str = "single-pass"  # the one to prefer; llm-compressor's takes what it declines
    store: LayerStore | None = None
    batch_tokens: int = BATCH_TOKENS
    shared_weights: bool = False
    report: Report = no_progress


@dataclass(frozen=True)
class Pipeline:
    """A way to run a recipe: ``takes`` says whether it covers the job (its plan, or None after
    noting why in the choices), ``run`` runs it (job, plan, choices so far, the calibration
    arguments) and returns the choices for the manifest."""

    name: str
    takes: Callable[[QuantizeJob, dict[str, Any]], Any]
    run: Callable[[QuantizeJob, Any, dict[str, Any], dict[str, Any]], dict[str, Any]]


def quantize_model(model, tokenizer, recipe_text: str, dataset, max_seq_len: int,
                   acc: Accelerator, **options: Any) -> dict[str, Any]:
    """Quantize ``model`` in place with the first pipeline of ``PIPELINES`` that takes the
    recipe (requant's single pass, else llm-compressor's oneshot); returns the choices made,
    for the manifest. ``options``: the other fields of ``QuantizeJob``."""
    return run_job(QuantizeJob(model, tokenizer, recipe_text, dataset, max_seq_len, acc,
                               **options))


def run_job(job: QuantizeJob) -> dict[str, Any]:
    import torch

    choices: dict[str, Any] = {"allow_tf32": False, "activation_cache": "cpu"}
    if job.acc.kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = job.allow_tf32
        torch.backends.cudnn.allow_tf32 = job.allow_tf32
        choices["allow_tf32"] = job.allow_tf32
    kwargs: dict[str, Any] = {}
    if job.dataset is not None:
        kwargs = calibration_kwargs(job.model, job.dataset, job.max_seq_len, job.acc,
                                    job.activation_cache)
        choices["activation_cache"] = kwargs["sequential_offload_device"]
    for pipeline in PIPELINES:
        if (taken := pipeline.takes(job, choices)) is not None:
            return pipeline.run(job, taken, choices, kwargs)
    raise AssertionError("llm-compressor's pipeline takes every recipe")


def _single_pass_takes(job: QuantizeJob, choices: dict[str, Any]) -> Any:
    if job.pipeline != "single-pass" or job.dataset is None:
        return None
    single = plan(job.recipe_text)
    if single is not None and (outside := outside_layers(job.model, single.gptq)):
        choices["single_pass_declined"] = (f"quantizes {', '.join(outside[:3])} outside the "
                                           "decoder layers, which the single pass does not "
                                           "calibrate")
        return None
    return single


def _single_pass_run(job: QuantizeJob, single: Any, choices: dict[str, Any],
                     kwargs: dict[str, Any]) -> dict[str, Any]:
    # under torchrun: this rank's shard, merged per layer with the others
    return choices | quantize_single_pass(
        job.model, single, job.dataset, job.acc.torch_device,
        kwargs["sequential_offload_device"], tolerance=job.smoothing_tolerance,
        store=job.store, ranks=Ranks.current(), shared_weights=job.shared_weights,
        batch_tokens=job.batch_tokens, report=job.report)


def _llm_compressor_run(job: QuantizeJob, _taken: Any, choices: dict[str, Any],
                        kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch
    from llmcompressor import oneshot

    from requant.quantization.rank_safe import run_with_barriers, smooth_modifiers

    if job.shared_weights:
        raise ValueError("shared_weights needs the single pass, which this recipe or model "
                         "declined: every rank must load the weights")
    choices["pipeline"] = "llm-compressor"
    smooth_text, rest_text = split_recipe(job.recipe_text)
    model, tokenizer = job.model, job.tokenizer

    def run_rest(text: str) -> None:
        if torch.distributed.is_initialized():
            run_with_barriers(oneshot, text, model=model, processor=tokenizer, **kwargs)
        else:
            oneshot(model=model, processor=tokenizer, recipe=text, **kwargs)

    samples = len(job.dataset) if job.dataset is not None else 0
    with layer_progress(model, samples, calibration_passes(job.recipe_text), job.report):
        if smooth_text is None or job.dataset is None:
            run_rest(job.recipe_text)
            return choices
        choices["smoothing_check"] = smooth_checked(
            model, smooth_text, job.dataset, job.smoothing_tolerance,
            lambda text: oneshot(model=model, processor=tokenizer,
                                 recipe=smooth_modifiers(text), **kwargs))
        if rest_text is not None:
            run_rest(rest_text)
    return choices


#: Tried in order; the first that takes the job runs it (as llm-compressor's own pipeline
#: registry chooses by the recipe). The last takes every recipe.
PIPELINES: tuple[Pipeline, ...] = (
    Pipeline("single-pass", _single_pass_takes, _single_pass_run),
    Pipeline("llm-compressor", lambda _job, _choices: True, _llm_compressor_run),
)


def calibration_kwargs(model, dataset, max_seq_len: int, acc: Accelerator,
                       activation_cache: ActivationCache) -> dict[str, Any]:
    """oneshot's data arguments: our order (no reshuffle), and where activations wait."""
    import torch

    tokens = sum(len(ids) for ids in dataset["input_ids"])
    free = torch.cuda.mem_get_info()[0] if acc.kind == "cuda" else None
    device = activation_cache_device(
        activation_cache, acc, estimate_cache_bytes(tokens, model.config.hidden_size), free
    )
    return {"dataset": dataset, "num_calibration_samples": len(dataset),
            "max_seq_length": max_seq_len, "shuffle_calibration_samples": False,
            "sequential_offload_device": device}


#: The exactness check's probe: this many calibration samples, each cut to this many tokens.
PROBE_SAMPLES, PROBE_TOKENS = 4, 128


def smooth_checked(model, smooth_text: str, dataset, tolerance: float | None,
                   run: Callable[[str], None]) -> dict[str, Any]:
    """Run SmoothQuant alone, then prove every decoder layer still computes what it did."""
    import yaml

    model_type = model.config.model_type
    mappings = [m for args in yaml.safe_load(smooth_text)["smooth_stage"]["smooth_modifiers"]
                .values() for m in (args.get("mappings") or [])]
    known = ARCHITECTURES.get(model_type)
    arch = Architecture(mappings, offset_norm=bool(known and known.offset_norm))
    groups = first_layer_balance(model, mappings)
    balance = [name for names in groups.values() for name in names]
    ids = [list(row)[:PROBE_TOKENS] for row in dataset["input_ids"][:PROBE_SAMPLES]]
    t0 = time.perf_counter()
    before = probe(model, ids, balance, record_layers=True)
    t1 = time.perf_counter()
    with plain_norms(model, arch):
        run(smooth_text)
    t2 = time.perf_counter()
    after = probe(model, ids, balance)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    check = check_smoothing(model, before, after, groups, tolerances(dtype, tolerance),
                            model_type)
    return check.as_record() | {"probe_s": round(t1 - t0 + time.perf_counter() - t2, 2)}


def release_session() -> None:
    """Drop llm-compressor's session, which holds the model: call after saving (the save writes
    the session's recipe), so the model's memory can actually be freed."""
    from llmcompressor.core import reset_session

    reset_session()
