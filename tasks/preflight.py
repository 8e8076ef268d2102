"""Preflight stage: every cheap check, before the run folder or any model exists."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from requant.preflight import check_candidates, run_preflight
from requant.quantization.hardware import Accelerator
from requant.quantization.recipes import ResolvedRecipe
from requant.settings import Candidate, PipelineSettings


@task(name="preflight")
def preflight(settings: PipelineSettings) -> tuple[ResolvedRecipe, Accelerator]:
    """Not retried: what it finds wrong is the input, and the error names the field to fix."""
    recipe, acc = run_preflight(settings)
    get_run_logger().info("preflight ok: recipe %s (scheme %s, sha256 %s) on %s", recipe.origin,
                          recipe.scheme, recipe.sha256[:12], acc.name)
    return recipe, acc


@task(name="preflight-candidates")
def preflight_candidates(settings: PipelineSettings, acc: Accelerator
                         ) -> list[tuple[Candidate, PipelineSettings, ResolvedRecipe]]:
    """The search's candidates, each checked as the run's own recipe is (none without one)."""
    checked = check_candidates(settings, acc)
    for cand, _, recipe in checked:
        get_run_logger().info("candidate %s: recipe %s (scheme %s, sha256 %s)", cand.name,
                              recipe.origin, recipe.scheme, recipe.sha256[:12])
    return checked
