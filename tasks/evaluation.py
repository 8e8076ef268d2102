"""Evaluation stage: the baseline (cached) and the candidate, each as vLLM serves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from requant.evaluation.lmeval import (
    ModelEvaluation,
    evaluate_baseline_cached,
    evaluate_model,
)
from requant.progress import StageProgress
from requant.settings import EvaluationSettings


def _report(result: ModelEvaluation) -> None:
    get_run_logger().info(
        "%s: %s %s = %.4f over %d documents%s (%s)", result.label, result.task, result.metric,
        result.score, len(result.per_doc), " (cached)" if result.cached else "",
        result.result_dir,
    )
    create_table_artifact(
        key=f"eval-{result.label}",
        table=[{"task": t, "metric": m, "value": round(v, 4)}
               for t, ms in result.all_scores.items() for m, v in ms.items()],
        description=f"lm-eval results for the {result.label} ({result.model})"
        + (", reused from the baseline cache" if result.cached else ""),
    )


@task(name="evaluate-baseline")
def evaluate_baseline(
    cfg: EvaluationSettings, source_record: dict[str, Any], model_dir: Path, cache_dir: Path,
    out_dir: Path, on_gpu: bool,
) -> ModelEvaluation:
    """Cached across runs: a nightly run does not re-evaluate an unchanged source."""
    progress = StageProgress("evaluation-baseline", "evaluating the baseline")
    result = evaluate_baseline_cached(cfg, source_record, model_dir, cache_dir, out_dir, on_gpu,
                                      report=progress)
    progress.done("from the cache" if result.cached else f"score {result.score:.4f}")
    _report(result)
    return result


@task(name="evaluate-candidate")
def evaluate_candidate(
    cfg: EvaluationSettings, checkpoint: Path, out_dir: Path, on_gpu: bool
) -> ModelEvaluation:
    """Never cached: the candidate is new by definition."""
    progress = StageProgress("evaluation-candidate", "evaluating the candidate")
    result = evaluate_model("candidate", checkpoint, cfg, out_dir, on_gpu=on_gpu,
                            report=progress)
    progress.done(f"score {result.score:.4f}")
    _report(result)
    return result
