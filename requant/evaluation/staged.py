"""Evaluation in stages: one vLLM server per model, the questions asked in the gate's fixed,
seeded order, a look after each stage.

The baseline always answers every stage (it is cached across runs, so this costs nothing on a
nightly run); the candidate stops as soon as the gate's decision is clear. Both are asked the
same stages, so every question sees the same prompt (few-shot draws included) on both sides.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from requant.atomic import atomic_directory, write_json_atomic
from requant.errors import SettingsError
from requant.evaluation.gate import GateDecision, decide, rule_key
from requant.evaluation.lmeval import (
    ModelEvaluation,
    baseline_cache_key,
    evaluated_with,
    load_record,
    per_doc_scores,
    run_lm_eval_in_vllm,
    run_lm_eval_on_server,
    save_record,
)
from requant.evaluation.sequential import critical_values
from requant.evaluation.tasks import (
    effective_looks,
    render_task_dir,
    stage_plan,
    task_dir,
    task_sizes,
)
from requant.progress import Report, no_progress
from requant.serving.server import running_server
from requant.settings import EvaluationSettings, GateSettings

#: After each stage: (the record so far, stage index, stages) -> stop now?
StopRule = Callable[[ModelEvaluation, int, int], bool]


def evaluate_staged(
    label: str, model_dir: Path, cfg: EvaluationSettings, gate: GateSettings, out_dir: Path,
    *, on_gpu: bool, report: Report = no_progress, stop: StopRule | None = None,
    with_: dict[str, Any] | None = None,
) -> ModelEvaluation:
    """Serve ``model_dir`` and answer the stages until ``stop`` says so; writes ``out_dir``
    atomically (per-question scores, lm-eval's samples and results, the summary)."""
    started = time.monotonic()
    with_ = with_ if with_ is not None else evaluated_with(cfg, gate)
    with atomic_directory(out_dir) as tmp:
        include = task_dir(cfg)
        rendered = render_task_dir(include, tmp / "tasks") if include else None
        sizes = task_sizes(cfg, rendered)
        if cfg.backend == "vllm":
            results = run_lm_eval_in_vllm(model_dir, cfg, rendered, tmp / "lm_eval_output",
                                          tmp / "lm_eval.log")
            samples = results.pop("samples", {})
            write_json_atomic(tmp / "results_stage1.json", results)
            per_doc = _merge({}, {t: samples.get(t, []) for t in cfg.tasks}, tmp, 0)
            evaluation = ModelEvaluation(label, str(model_dir), per_doc, sizes, with_, out_dir,
                                         timings_s={}, stages=1)
            if stop:
                stop(evaluation, 0, 1)
        else:
            evaluation = _serve_stages(label, model_dir, cfg, gate, rendered, sizes, with_,
                                       tmp, out_dir, on_gpu, report, stop)
        evaluation = ModelEvaluation(
            evaluation.label, evaluation.model, evaluation.per_doc, evaluation.totals,
            evaluation.evaluated_with, out_dir, False,
            evaluation.timings_s | {"total": round(time.monotonic() - started, 1)},
            evaluation.stages)
        save_record(tmp, evaluation)
    return evaluation


def _serve_stages(label: str, model_dir: Path, cfg: EvaluationSettings, gate: GateSettings,
                  rendered: Path | None, sizes: dict[str, int], with_: dict[str, Any],
                  tmp: Path, out_dir: Path, on_gpu: bool, report: Report,
                  stop: StopRule | None) -> ModelEvaluation:
    plan = stage_plan(sizes, effective_looks(cfg, gate), gate.order_seed)
    per_doc: dict[str, dict[int, float]] = {}
    timings: dict[str, float] = {}
    with running_server(model_dir, cfg.server, tmp / "server.log",
                        served_name=f"requant-{label}", on_gpu=on_gpu) as server:
        timings["server_startup"] = server.startup_s
        for k, stage in enumerate(plan):
            samples = {}
            for task, questions in stage.items():
                if not questions:
                    continue
                t0 = time.monotonic()
                try:
                    results = run_lm_eval_on_server(
                        model_dir, server.base_url, server.served_model_name, cfg, rendered,
                        task, questions, f"{label} stage {k + 1}/{len(plan)}", report)
                except Exception:
                    server.check_alive()  # a dead server is the cause: say so, with its log
                    raise
                timings[f"task:{task}"] = round(timings.get(f"task:{task}", 0.0)
                                                + time.monotonic() - t0, 1)
                samples[task] = results.pop("samples", {}).get(task, [])
                write_json_atomic(tmp / f"results_{task}_stage{k + 1}.json", results)
            # lm-eval may turn failed requests into empty answers after its retries; a server
            # that died meanwhile would otherwise look like a model scoring zero.
            server.check_alive()
            per_doc = _merge(per_doc, samples, tmp, k)
            evaluation = ModelEvaluation(label, str(model_dir), per_doc, sizes, with_, out_dir,
                                         timings_s=timings, stages=k + 1)
            if stop is not None and stop(evaluation, k, len(plan)):
                break
    return evaluation


def _merge(per_doc: dict[str, dict[int, float]], samples: dict[str, list[dict[str, Any]]],
           tmp: Path, stage: int) -> dict[str, dict[int, float]]:
    merged = {k: dict(v) for k, v in per_doc.items()}
    for task, rows in samples.items():
        with (tmp / f"samples_{task}.jsonl").open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row | {"requant_stage": stage + 1}, default=str) + "\n")
        for key, scores in per_doc_scores(task, rows).items():
            merged.setdefault(key, {}).update(scores)
    return merged


def evaluate_baseline_cached(
    cfg: EvaluationSettings, gate: GateSettings, source_record: dict[str, Any], model_dir: Path,
    cache_dir: Path, out_dir: Path, on_gpu: bool, report: Report = no_progress,
) -> ModelEvaluation:
    """The unquantized source on every stage, from the cache when nothing that determines it
    changed (source identity + everything in ``evaluated_with``)."""
    with_ = evaluated_with(cfg, gate)
    key = baseline_cache_key(source_record, with_)
    cached = Path(cache_dir) / "baseline-eval" / key
    if (cached / "summary.json").is_file():
        with atomic_directory(out_dir) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            write_json_atomic(tmp / "cache.json", {"key": key, "from": str(cached)})
        return load_record("baseline", out_dir, cached=True)
    result = evaluate_staged("baseline", model_dir, cfg, gate, out_dir, on_gpu=on_gpu,
                             report=report, with_=with_)
    with atomic_directory(cached) as tmp:
        shutil.copytree(out_dir, tmp, dirs_exist_ok=True)
    return result


def check_baseline(baseline: ModelEvaluation, gate: GateSettings) -> None:
    """Before any quantization: every rule's metric exists, and the source can do the task."""
    problems = []
    for i, rule in enumerate(gate.rules):
        key = rule_key(rule.task, rule.metric)
        if key not in baseline.per_doc:
            reported = sorted(k.split("|", 1)[1] for k in baseline.per_doc
                              if k.startswith(f"{rule.task}|"))
            problems.append(f"gate.rules.{i}.metric: {rule.task} reports {reported}, not "
                            f"{rule.metric!r}. Use one of those.")
            continue
        score = baseline.scores()[key]
        if score < rule.min_baseline:
            problems.append(
                f"gate.rules.{i}: the source scores {score:.4f} on {rule.task} {rule.metric}, "
                f"below min_baseline {rule.min_baseline}: it cannot show a loss on this task, "
                "so no gate decision is possible. Gate on a task the source can do, or lower "
                "min_baseline deliberately.")
    if problems:
        raise SettingsError("the baseline evaluation ends the run before quantization:\n  - "
                            + "\n  - ".join(problems))


def evaluate_candidate_gated(
    cfg: EvaluationSettings, gate: GateSettings, baseline: ModelEvaluation, checkpoint: Path,
    out_dir: Path, on_gpu: bool, report: Report = no_progress,
) -> tuple[ModelEvaluation, GateDecision]:
    """The candidate, stage by stage, stopping as soon as the gate's decision is clear."""
    looks = effective_looks(cfg, gate)
    zs = critical_values(tuple(looks), 1 - gate.confidence)
    decisions: list[GateDecision] = []

    def stop(evaluation: ModelEvaluation, k: int, stages: int) -> bool:
        decision = decide(baseline.evidence(), evaluation.evidence(), gate, look=k + 1,
                          looks=stages, z=zs[k])
        decisions.append(decision)
        return decision.final

    candidate = evaluate_staged("candidate", checkpoint, cfg, gate, out_dir, on_gpu=on_gpu,
                                report=report, stop=stop)
    return candidate, decisions[-1]
