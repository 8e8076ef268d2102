"""Quantization stage: oneshot on the GPU worker (or the CPU), then verification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from requant.calibration import CalibrationSet
from requant.gpu_memory import gpu_memory
from requant.progress import StageProgress
from requant.quantization.checkpoint import QuantizedCheckpoint, quantize_checkpoint
from requant.quantization.hardware import Accelerator, cpu_has_native_bf16
from requant.quantization.memory_plan import (
    MemoryPlan,
    available_host_bytes,
    check_memory_plan,
    plan_for_source,
)
from requant.quantization.recipes import ResolvedRecipe
from requant.quantization.smoothing import fit_to_model
from requant.settings import PipelineSettings
from requant.source import ResolvedSource


@task(name="fit-recipe")
def fit_recipe(recipe: ResolvedRecipe, source: ResolvedSource) -> ResolvedRecipe:
    """Seconds, before calibration: an architecture SmoothQuant cannot be exact on stops here."""
    model_type = json.loads((source.path / "config.json").read_text()).get("model_type", "")
    fitted = fit_to_model(recipe, model_type)
    if fitted is not recipe:
        get_run_logger().info("SmoothQuant mappings for %s named in the recipe", model_type)
    return fitted


@task(name="plan-memory")
def plan_quantization_memory(settings: PipelineSettings, source: ResolvedSource,
                             recipe: ResolvedRecipe, acc: Accelerator) -> MemoryPlan:
    """Seconds, before loading: what the stage will hold in host and GPU memory, refused with
    the numbers and the setting to change when it cannot fit."""
    on_gpu = acc.kind == "cuda"
    gpu = gpu_memory() if on_gpu else None
    plan = plan_for_source(source.path, settings, on_gpu,
                           fp32=not on_gpu and not cpu_has_native_bf16(),
                           gpu_total=gpu[1] if gpu else None,
                           calibrates=recipe.needs_calibration_data, recipe_text=recipe.text)
    get_run_logger().info("memory plan: %s", plan.describe())
    check_memory_plan(plan, available_host_bytes(), gpu[1] if gpu else None)
    return plan


# the flow logs prints; not here, where library code prints to a captured stdout
# (docs/architecture.md, "Prints and the run log")
@task(name="quantize", log_prints=False)
def quantize(
    settings: PipelineSettings,
    source: ResolvedSource,
    calib: CalibrationSet | None,
    recipe: ResolvedRecipe,
    acc: Accelerator,
    out_dir: Path,
    run: dict[str, Any],
) -> QuantizedCheckpoint:
    """Not retried: a failure here is a property of the inputs, and it costs GPU hours."""
    logger = get_run_logger()
    logger.info("quantizing %s with %s (%s) on %s", source.model_id, recipe.origin,
                recipe.scheme, acc.name)
    progress = StageProgress("quantization", f"quantizing {source.model_id}")
    ckpt = quantize_checkpoint(settings, source, calib, recipe, acc, out_dir, run,
                               report=progress)
    progress.done(f"checkpoint verified: {out_dir}")
    t = ckpt.manifest["timings_s"]
    logger.info("checkpoint written to %s: oneshot %.1f s, total %.1f s, peak RSS %.2f GiB",
                ckpt.path, t["oneshot"], t["total"], ckpt.manifest["peak_memory_gib"]["host_rss"])
    return ckpt
