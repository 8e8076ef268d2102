"""The gate stage: decide, write decision.json, show it in the UI; the flow acts on it."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from requant.atomic import atomic_directory, write_json_atomic
from requant.evaluation.gate import GateDecision, decide, render_decision
from requant.evaluation.lmeval import ModelEvaluation
from requant.settings import GateSettings


@task(name="gate")
def gate(
    baseline: ModelEvaluation, candidate: ModelEvaluation, cfg: GateSettings, out_dir: Path
) -> GateDecision:
    """Records the decision whatever it is: a refusal is as much evidence as a pass."""
    decision = decide(baseline.scores(), candidate.scores(), cfg, task=candidate.task,
                      metric=candidate.metric)
    with atomic_directory(out_dir) as tmp:
        write_json_atomic(tmp / "decision.json", decision.as_record()
                          | {"baseline": baseline.as_record(), "candidate": candidate.as_record()})
    create_markdown_artifact(key="gate-decision", markdown=render_decision(decision),
                             description=f"gate {decision.status}")
    log = get_run_logger()
    (log.info if decision.promote else log.warning)(
        "gate %s (%s): %s", decision.status, "promote" if decision.promote else "stop",
        "; ".join(decision.reasons))
    return decision
