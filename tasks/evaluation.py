"""Evaluation stage: the baseline (cached, before any quantization) and the candidate, staged,
with the gate looking after each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from requant.evaluation.gate import GateDecision
from requant.evaluation.lmeval import ModelEvaluation
from requant.evaluation.staged import (
    EvalJob,
    check_baseline,
    evaluate_baseline_cached,
    evaluate_candidate_gated,
)
from requant.progress import StageProgress
from requant.settings import EvaluationSettings, GateSettings


def _report(result: ModelEvaluation) -> None:
    scores = result.scores()
    get_run_logger().info(
        "%s: %s%s (%s)", result.label,
        ", ".join(f"{k} = {v:.4f} over {len(result.per_doc[k])}" for k, v in scores.items()),
        " (cached)" if result.cached else "", result.result_dir)
    create_table_artifact(
        key=f"eval-{result.label}",
        table=[{"task": k.split("|")[0], "metric": k.split("|")[1], "value": round(v, 4),
                "questions": len(result.per_doc[k])} for k, v in scores.items()],
        description=f"lm-eval results for the {result.label} ({result.model})"
        + (f", reused from the cache ({result.label}'s answers to the same questions)"
           if result.cached else ""),
    )


# the flow logs prints; not here, where library code prints to a captured stdout
# (docs/architecture.md, "Prints and the run log")
@task(name="evaluate-baseline", log_prints=False)
def evaluate_baseline(
    cfg: EvaluationSettings, gate: GateSettings, source_record: dict[str, Any], model_dir: Path,
    cache_dir: Path, out_dir: Path, on_gpu: bool,
) -> ModelEvaluation:
    """Before quantization, the baseline's first stage: a source that cannot do the gate's
    tasks ends the run here, before any GPU hour is spent on it. Later stages only if the
    candidate's first look is undecided (``evaluate_candidate``). Cached per stage: a nightly
    run does not re-evaluate an unchanged source."""
    progress = StageProgress("evaluation-baseline", "evaluating the baseline")
    result = evaluate_baseline_cached(EvalJob(cfg, gate, on_gpu, progress), source_record,
                                      model_dir, cache_dir, out_dir, upto=1)
    progress.done(("from the cache, " if result.cached else "") + f"{result.stages} stage(s)")
    _report(result)
    check_baseline(result, gate)
    return result


# the flow logs prints; not here, where library code prints to a captured stdout
# (docs/architecture.md, "Prints and the run log")
@task(name="evaluate-candidate", log_prints=False)
def evaluate_candidate(
    cfg: EvaluationSettings, gate: GateSettings, baseline: ModelEvaluation, checkpoint: Path,
    out_dir: Path, on_gpu: bool, source_record: dict[str, Any], source_dir: Path,
    cache_dir: Path,
) -> tuple[ModelEvaluation, GateDecision, ModelEvaluation]:
    """Stops when the gate's answer is clear; the baseline answers a further stage only when
    the candidate needs it. Answers of the same served bytes are read back from the cache
    (``requant.evaluation.candidate_cache``), look by look."""
    progress = StageProgress("evaluation-candidate", "evaluating the candidate")
    job = EvalJob(cfg, gate, on_gpu, progress)

    def more_baseline(upto: int) -> ModelEvaluation:
        get_run_logger().info("look %d is undecided: the baseline answers stage %d (cached for "
                              "later runs), then the candidate continues", upto - 1, upto)
        return evaluate_baseline_cached(job, source_record, source_dir, cache_dir,
                                        baseline.result_dir, upto=upto)

    def fresh_baseline(upto: int) -> ModelEvaluation:
        get_run_logger().warning("the cached baseline was asked with other prompts than the "
                                 "candidate (its task data changed): it answers again")
        return evaluate_baseline_cached(job, source_record, source_dir, cache_dir,
                                        baseline.result_dir, upto=upto, refresh=True)

    result, decision, baseline = evaluate_candidate_gated(
        job, baseline, checkpoint, out_dir, more_baseline=more_baseline, cache_dir=cache_dir,
        fresh_baseline=fresh_baseline)
    progress.done(f"gate {decision.status} after {decision.questions} of {decision.total} "
                  "questions")
    _report(result)
    return result, decision, baseline
