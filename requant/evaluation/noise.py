"""The baseline's own noise: the source evaluated twice (A/A) exactly as the gate evaluates it,
counting the answers that flip from nondeterminism alone (the server's batching, thread
scheduling), with no quantization at all.

The gate does not subtract this count: a flip from noise is a discordant pair, which the score
test already weighs in both directions (docs/evaluation.md, "Pairing, checked; noise,
measured"). What a run's gate record gets is the measurement that applies to it: the A/A record
is stored under the baseline cache's key (the source's identity + everything in
``evaluated_with``), so a record from other hardware, server options or tasks never applies,
and a run with none says so and how to measure it (``requant noise``).
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from requant.atomic import write_json_atomic
from requant.evaluation.gate import decide, rule_key, unpaired_prompts
from requant.evaluation.lmeval import baseline_cache_key, evaluated_with, hardware_name
from requant.evaluation.sequential import critical_values
from requant.evaluation.staged import EvalJob, evaluate_staged
from requant.evaluation.task_files import effective_looks
from requant.settings import EvaluationSettings, GateSettings

NOISE_DIR = "baseline-noise"


def measure_noise(cfg: EvaluationSettings, gate: GateSettings, model_dir: Path, *,
                  on_gpu: bool, stages: int = 1, work: Path | None = None) -> dict[str, Any]:
    """Two fresh servers on the same model, each answering the gate's first ``stages``: per
    rule the questions that differ, and the gate's decision comparing the model with itself."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="requant-aa-", dir=work) as tmp:
        for label in ("a1", "a2"):
            runs.append(evaluate_staged(EvalJob(cfg, gate, on_gpu), label, model_dir,
                                        Path(tmp) / label, upto=stages))
    a1, a2 = runs
    looks = effective_looks(cfg, gate)
    z = critical_values(tuple(looks), 1 - gate.confidence)[stages - 1]
    decision = decide(a1.evidence(), a2.evidence(), gate, look=stages, looks=len(looks), z=z)
    rules = []
    for rule in gate.rules:
        first, second = (r.per_doc[rule_key(rule.task, rule.metric)] for r in (a1, a2))
        flips = sorted(d for d in first if first[d] != second.get(d))
        rules.append({"task": rule.task, "metric": rule.metric, "questions": len(first),
                      "flips": len(flips), "flipped_questions": flips[:50],
                      "score_a1": a1.score(rule.task, rule.metric),
                      "score_a2": a2.score(rule.task, rule.metric)})
    return {"measured": True, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": str(model_dir), "hardware": hardware_name(on_gpu), "stages": stages,
            "rules": rules, "evaluated_with": a1.evaluated_with,
            "prompts_paired": not unpaired_prompts(a1.evidence(), a2.evidence(),
                                                   {r.task for r in gate.rules}),
            "decision_against_itself": {"status": decision.status,
                                        "reasons": decision.reasons},
            "timings_s": [a1.timings_s, a2.timings_s]}


def noise_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / NOISE_DIR / f"{key}.json"


def save_noise(cache_dir: Path, key: str, record: dict[str, Any]) -> Path:
    return write_json_atomic(noise_path(cache_dir, key), record | {"key": key})


def noise_for(cache_dir: Path, key: str) -> dict[str, Any]:
    """The A/A measurement for exactly this evaluation of this source, or why there is none."""
    path = noise_path(cache_dir, key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("key") == key and record.get("measured"):
        return {k: v for k, v in record.items() if k != "evaluated_with"} | {"from": str(path)}
    return {"measured": False, "key": key,
            "measure_with": "requant noise --config <these settings> (two evaluations of the "
                            "source's first stage; the next runs' gate records carry it)"}


def noise_key(source_record: dict[str, Any], cfg: EvaluationSettings,
              gate: GateSettings, on_gpu: bool) -> str:
    """The key the baseline cache gives this source and evaluation."""
    return baseline_cache_key(source_record, evaluated_with(cfg, gate, on_gpu))


def noise_for_source(cache_dir: Path, source_record: dict[str, Any], cfg: EvaluationSettings,
                     gate: GateSettings, on_gpu: bool) -> dict[str, Any]:
    return noise_for(cache_dir, noise_key(source_record, cfg, gate, on_gpu))


def noise_line(noise: dict[str, Any]) -> str:
    """One line for the UI and the logs."""
    if not noise.get("measured"):
        return "baseline noise (A/A): not measured for this evaluation; `requant noise` does it"
    parts = [f"{r['task']} {r['metric']}: {r['flips']} of {r['questions']} flipped"
             for r in noise["rules"]]
    return (f"baseline noise (A/A, {noise['measured_at']}, {noise['hardware']}): "
            + "; ".join(parts))
