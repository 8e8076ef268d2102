"""The gate stage: write decision.json, show it in the UI; the flow acts on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from requant.atomic import atomic_directory, write_json_atomic
from requant.evaluation.gate import GateDecision, render_decision
from requant.evaluation.lmeval import ModelEvaluation
from requant.evaluation.noise import noise_line


@task(name="gate")
def record_gate(decision: GateDecision, baseline: ModelEvaluation, candidate: ModelEvaluation,
                out_dir: Path, noise: dict[str, Any]) -> GateDecision:
    """Records the decision whatever it is: a refusal is as much evidence as a pass. With it,
    the baseline's measured noise for this very evaluation, or that there is none."""
    with atomic_directory(out_dir) as tmp:
        write_json_atomic(tmp / "decision.json", decision.as_record()
                          | {"baseline": baseline.as_record(), "candidate": candidate.as_record(),
                             "noise": noise})
    create_markdown_artifact(key="gate-decision", markdown=render_decision(decision)
                             + f"\n\n{noise_line(noise)}",
                             description=f"gate {decision.status}")
    log = get_run_logger()
    (log.info if decision.promote else log.warning)(
        "gate %s (%s) after %d of %d questions: %s", decision.status,
        "promote" if decision.promote else "stop", decision.questions, decision.total,
        "; ".join(decision.reasons))
    return decision
