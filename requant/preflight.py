"""Every cheap check, before anything expensive: a bad recipe, an unservable scheme, an
unknown lm-eval task, a missing serving environment or an unusable publish or rollout setting
fails in seconds, not after an hour of calibration."""

from __future__ import annotations

from requant.errors import SettingsError
from requant.evaluation.task_files import validate_tasks
from requant.gpu_memory import check_gpu_budget
from requant.hub.client import check_publish_settings
from requant.quantization.distributed import check_rank_inputs
from requant.quantization.hardware import (
    Accelerator,
    check_gpu_count,
    check_scheme_supported,
    detect_accelerator,
)
from requant.quantization.recipes import ResolvedRecipe, resolve_recipe
from requant.serving.server import serving_python
from requant.settings import Candidate, PipelineSettings
from requant.source import check_local_source


def run_preflight(settings: PipelineSettings) -> tuple[ResolvedRecipe, Accelerator]:
    check_local_source(settings.source)
    recipe = resolve_recipe(settings.quantization)
    acc = detect_accelerator(settings.quantization.device)
    check_scheme_supported(recipe.scheme, acc)
    check_gpu_count(settings.quantization.gpus, settings.quantization.device, acc)
    check_rank_inputs(settings.quantization.gpus, settings.calibration.num_samples
                      if recipe.needs_calibration_data else None)
    if settings.evaluation.enabled:
        serving_python(settings.evaluation.server)
        validate_tasks(settings.evaluation)
    check_publish_settings(settings.hub)
    check_gpu_budget(settings, on_gpu=acc.kind == "cuda")
    from requant.rollout.targets import target_of

    if (target := target_of(settings)) is not None:
        target.check(settings)
    return recipe, acc


def check_candidates(settings: PipelineSettings, acc: Accelerator
                     ) -> list[tuple[Candidate, PipelineSettings, ResolvedRecipe]]:
    """Each search candidate's recipe and scheme, checked as the run's own are, before anything
    is loaded: one bad candidate is bad input (exit 2 naming it), not a result found an hour in."""
    from requant.search import candidate_settings

    checked = []
    for i, cand in enumerate(settings.search.candidates):
        try:
            s = candidate_settings(settings, cand)
            recipe = resolve_recipe(s.quantization)
            check_scheme_supported(recipe.scheme, acc)
        except SettingsError as exc:
            raise SettingsError(f"search.candidates.{i} ({cand.name}): {exc}") from None
        checked.append((cand, s, recipe))
    return checked
