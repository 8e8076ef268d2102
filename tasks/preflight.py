"""Preflight stage: every cheap check, before the run folder or any model exists."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from requant.preflight import run_preflight
from requant.quantization.hardware import Accelerator
from requant.quantization.recipes import ResolvedRecipe
from requant.settings import PipelineSettings


@task(name="preflight")
def preflight(settings: PipelineSettings) -> tuple[ResolvedRecipe, Accelerator]:
    """Not retried: what it finds wrong is the input, and the error names the field to fix."""
    recipe, acc = run_preflight(settings)
    get_run_logger().info("preflight ok: recipe %s (scheme %s, sha256 %s) on %s", recipe.origin,
                          recipe.scheme, recipe.sha256[:12], acc.name)
    return recipe, acc
