"""Evaluation in stages: one vLLM server per model, the questions asked in the gate's fixed,
seeded order, a look after each stage.

The baseline answers only the stages the decision needs: its first stage before quantization
(enough to refuse a source that cannot do the task), the next one only when the candidate's
look is undecided, and each answered stage is cached and reused by later runs. The gate's ratio-form
test compares the two on the questions both answered, so no whole-set baseline score is needed:
a clear decision at look 1 costs look 1 on both. Both are asked the same stages, so every
question sees the same prompt (few-shot draws included) on both sides.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from requant.atomic import atomic_directory, write_json_atomic
from requant.errors import EvaluationStalled, SettingsError
from requant.evaluation.candidate_cache import CandidateCache, StopRule
from requant.evaluation.gate import (
    EvidenceRecord,
    GateDecision,
    decide,
    rule_key,
    unpaired_prompts,
)
from requant.evaluation.lmeval import (
    ModelEvaluation,
    baseline_cache_key,
    evaluated_with,
    load_record,
    per_doc_scores,
    prompt_hashes,
    run_lm_eval_in_vllm,
    run_lm_eval_on_server,
    save_record,
    tokenizer_fingerprint,
)
from requant.evaluation.sequential import critical_values
from requant.evaluation.task_files import (
    effective_looks,
    render_task_dir,
    stage_plan,
    task_dir,
    task_sizes,
)
from requant.progress import Report, no_progress
from requant.serving.server import running_server
from requant.settings import EvaluationSettings, GateSettings


@dataclass(frozen=True)
class EvalJob:
    """How every model of a run is evaluated: the tasks and server (``evaluation``), the gate's
    stages (``gate``), whether the servers run on the GPU, and where progress goes."""

    cfg: EvaluationSettings
    gate: GateSettings
    on_gpu: bool
    report: Report = no_progress

    @cached_property
    def with_(self) -> dict[str, Any]:
        """``evaluated_with`` for this job, computed once: the baseline cache's key and every
        record the job writes share it (it hashes the task files and asks the serving
        environment its vLLM version)."""
        return evaluated_with(self.cfg, self.gate, self.on_gpu)


@dataclass(frozen=True)
class _Staging:
    """One model's staged evaluation in progress: what it is, where it writes, what it asks."""

    label: str
    model_dir: Path
    out_dir: Path
    tmp: Path  # the atomic directory that becomes out_dir
    rendered: Path | None  # the task files rendered for this evaluation
    sizes: dict[str, int]
    with_: dict[str, Any]


def evaluate_staged(
    job: EvalJob, label: str, model_dir: Path, out_dir: Path, *,
    stop: StopRule | None = None, upto: int | None = None, prior: ModelEvaluation | None = None,
) -> ModelEvaluation:
    """Serve ``model_dir`` and answer the stages after ``prior``'s (all of them without one) up
    to stage ``upto`` (all), until ``stop`` says so; writes ``out_dir`` atomically (per-question
    scores, lm-eval's samples and results, the summary), ``prior``'s answers included."""
    started, cfg = time.monotonic(), job.cfg
    with_ = job.with_ | {"tokenizer": tokenizer_fingerprint(model_dir)}
    with atomic_directory(out_dir) as tmp:
        if prior is not None:  # its samples and results files; its scores are merged below
            shutil.copytree(prior.result_dir, tmp, dirs_exist_ok=True)
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
                                         timings_s={}, stages=1,
                                         prompts={t: prompt_hashes(samples.get(t, []))
                                                  for t in cfg.tasks})
            if stop:
                stop(evaluation, 0, 1)
        else:
            evaluation = _serve_stages(job, _Staging(label, model_dir, out_dir, tmp, rendered,
                                                     sizes, with_), stop, upto, prior)
        total = round(time.monotonic() - started + (prior.timings_s.get("total", 0.0)
                                                    if prior else 0.0), 1)
        evaluation = replace(evaluation, result_dir=out_dir, cached=False,
                             timings_s=evaluation.timings_s | {"total": total})
        save_record(tmp, evaluation)
    return evaluation


def _serve_stages(job: EvalJob, s: _Staging, stop: StopRule | None, upto: int | None,
                  prior: ModelEvaluation | None) -> ModelEvaluation:
    cfg, label, tmp = job.cfg, s.label, s.tmp
    plan = stage_plan(s.sizes, effective_looks(cfg, job.gate), job.gate.order_seed)
    first = prior.stages if prior else 0
    last = len(plan) if upto is None else min(upto, len(plan))
    if first >= last:  # nothing left to answer: no server started for nothing
        if prior is None:
            raise ValueError(f"no stage to answer (upto={upto}, {len(plan)} stages)")
        return prior
    per_doc = {k: dict(v) for k, v in prior.per_doc.items()} if prior else {}
    prompts = {k: dict(v) for k, v in prior.prompts.items()} if prior else {}
    timings = {k: v for k, v in (prior.timings_s if prior else {}).items() if k != "total"}
    evaluation = prior
    with running_server(s.model_dir, cfg.server, tmp / "server.log",
                        served_name=f"requant-{label}", on_gpu=job.on_gpu) as server:
        timings["server_startup"] = round(timings.get("server_startup", 0.0)
                                          + server.startup_s, 1)
        for k in range(first, last):
            stage = plan[k]
            samples = {}
            for task, questions in stage.items():
                if not questions:
                    continue
                t0 = time.monotonic()
                try:
                    results = run_lm_eval_on_server(
                        s.model_dir, server.base_url, server.served_model_name, cfg, s.rendered,
                        task, questions, f"{label} stage {k + 1}/{len(plan)}", job.report)
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
            for task, rows in samples.items():
                prompts.setdefault(task, {}).update(prompt_hashes(rows))
            evaluation = ModelEvaluation(label, str(s.model_dir), per_doc, s.sizes, s.with_,
                                         s.out_dir, timings_s=timings, stages=k + 1,
                                         prompts=prompts)
            if stop is not None and stop(evaluation, k, len(plan)):
                break
    assert evaluation is not None, "no stage left to answer"
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
    job: EvalJob, source_record: dict[str, Any], model_dir: Path, cache_dir: Path,
    out_dir: Path, upto: int | None = None, refresh: bool = False,
) -> ModelEvaluation:
    """The unquantized source's answers to the first ``upto`` stages (all by default): the
    stages the cache holds are reused (the key: source identity + everything in
    ``evaluated_with``), the missing ones answered and added to it. ``refresh``: the cache's
    stages are asked again and replace it (the questions were found to have changed)."""
    key = baseline_cache_key(source_record, job.with_)
    cached = Path(cache_dir) / "baseline-eval" / key
    have = load_record("baseline", cached, cached=True) \
        if (cached / "summary.json").is_file() and not refresh else None
    stages = len(effective_looks(job.cfg, job.gate))
    need = stages if upto is None else min(upto, stages)
    if have is not None and have.stages >= need:
        with atomic_directory(out_dir) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            write_json_atomic(tmp / "cache.json", {"key": key, "from": str(cached),
                                                   "stages": have.stages})
        return load_record("baseline", out_dir, cached=True)
    result = evaluate_staged(job, "baseline", model_dir, out_dir, upto=need, prior=have)
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


def gate_stop_rule(baseline: EvidenceRecord, gate: GateSettings, looks: list[float],
                   record: Callable[[GateDecision], None]) -> Callable[[EvidenceRecord, int],
                                                                        bool]:
    """After stage k (0-based): the gate's decision with look k's own critical value (spent
    over ``looks`` at 1 - confidence); True when it is final."""
    zs = critical_values(tuple(looks), 1 - gate.confidence)

    def stop(candidate: EvidenceRecord, k: int) -> bool:
        decision = decide(baseline, candidate, gate, look=k + 1, looks=len(zs), z=zs[k])
        record(decision)
        return decision.final

    return stop


def evaluate_candidate_gated(
    job: EvalJob, baseline: ModelEvaluation, checkpoint: Path, out_dir: Path, *,
    more_baseline: Callable[[int], ModelEvaluation] | None = None,
    cache_dir: Path | None = None,
    fresh_baseline: Callable[[int], ModelEvaluation] | None = None,
) -> tuple[ModelEvaluation, GateDecision, ModelEvaluation]:
    """``_gated`` (below); and with ``fresh_baseline``, once: when the baseline's questions were
    asked with other prompts than the candidate's (a Hub dataset or a task file changed since
    the baseline was cached), the baseline is asked again (``fresh_baseline(stages)``
    replaces its cache entry) and the gate decides on that, instead of failing every later
    run until someone deletes the cache by hand. A pairing that still fails is a real
    difference between the two and fails the gate."""
    candidate, decision, baseline = _gated(job, baseline, checkpoint, out_dir, more_baseline,
                                           cache_dir)
    tasks = {r.task for r in job.gate.rules}
    if fresh_baseline is None or not unpaired_prompts(baseline.evidence(),
                                                      candidate.evidence(), tasks):
        return candidate, decision, baseline
    job.report(0.0, "the baseline's questions were asked with other prompts than the "
                    "candidate's (the task's data changed since it was cached): asking the "
                    "baseline again")
    baseline = fresh_baseline(candidate.stages)
    return _gated(job, baseline, checkpoint, out_dir, more_baseline, cache_dir)


def _gated(
    job: EvalJob, baseline: ModelEvaluation, checkpoint: Path, out_dir: Path,
    more_baseline: Callable[[int], ModelEvaluation] | None, cache_dir: Path | None,
) -> tuple[ModelEvaluation, GateDecision, ModelEvaluation]:
    """The candidate, stage by stage, stopping as soon as the gate's decision is clear. When it
    reaches a stage the baseline has not answered, ``more_baseline(k)`` answers the baseline's
    stages up to k (cached for later runs), and the candidate continues where it stopped: the
    baseline never answers a question the decision did not need. With ``cache_dir``, stages the
    same served bytes already answered are read back (``candidate_cache``), look by look, and
    new ones kept. Returns (candidate, decision, the baseline as far as it was answered)."""
    gate, looks = job.gate, effective_looks(job.cfg, job.gate)
    decisions: list[GateDecision] = []
    candidate: ModelEvaluation | None = None
    cache = CandidateCache(cache_dir, checkpoint, job.cfg, gate, job.on_gpu) \
        if cache_dir is not None else None
    kept = cache.kept() if cache is not None else None
    while True:
        rule = gate_stop_rule(baseline.evidence(), gate, looks, decisions.append)

        def stop(ev: ModelEvaluation, k: int, _n: int, rule=rule) -> bool:
            return rule(ev.evidence(), k)

        replayed = cache.replay(kept, candidate.stages if candidate else 0, baseline.stages,
                                stop, out_dir) if cache is not None and kept else None
        candidate = replayed or candidate
        if replayed is None or not (decisions[-1].final or replayed.stages >= baseline.stages):
            candidate = evaluate_staged(job, "candidate", checkpoint, out_dir, stop=stop,
                                        upto=baseline.stages, prior=candidate)
            if cache is not None:
                cache.keep(candidate)
        if decisions[-1].final or more_baseline is None or baseline.stages >= len(looks):
            return candidate, decisions[-1], baseline
        asked, had = candidate.stages + 1, baseline.stages
        baseline = more_baseline(asked)
        if baseline.stages <= had:  # no progress: the loop would ask again forever
            raise EvaluationStalled(asked, baseline.stages)
