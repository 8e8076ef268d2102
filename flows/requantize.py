"""The main pipeline, as in docs/architecture.md:

    preflight -> source -> recipe fitted to the architecture -> memory plan (refused if it
      cannot fit) -> calibration -> [candidate ledger]
      -> baseline's first stage (cached; a source that cannot do the task ends the run here)
      -> quantization -> candidate evaluation, staged, the gate looking after each stage
         (search.candidates set: flows/search.py, each candidate in turn, the best that passes)
      -> publish -> rollout

A gate that does not pass raises GateFailed after recording its decision (and emitting
``requant.gate.failed``): the run fails and nothing leaves the machine. A gate that passes
publishes, emits ``requant.gate.passed`` with the commit, and then either runs the promote flow
itself (rollout.trigger=inline) or leaves that to the Prefect automation listening for the event
(rollout.trigger=automation, prefect.yaml). A candidate identical to one already published (the
candidate ledger) ends the run at once. Run it with ``requant run``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from requant.atomic import write_json_atomic
from requant.calibration import CalibrationSet
from requant.errors import GateFailed, RolloutFailed
from requant.evaluation.gate import GateDecision
from requant.evaluation.noise import noise_for_source
from requant.flows.search import Entry, candidate_dir, run_search
from requant.gpu_limit import check_gpu_limit, gpu_slots
from requant.ledger import (
    candidate_key,
    find_published,
    pending_rollout,
    record_published,
)
from requant.profile import settings_for
from requant.quantization.checkpoint import QuantizedCheckpoint
from requant.quantization.hardware import Accelerator
from requant.quantization.recipes import ResolvedRecipe
from requant.report import (
    build_summary,
    failure_record,
    render_failure,
    render_no_op,
    render_summary,
)
from requant.rollout.state import load_state
from requant.run_request import RunRequest, validate_request
from requant.rundir import RunDir
from requant.search import Outcome, table_rows
from requant.settings import PipelineSettings
from requant.source import ResolvedSource, fetch_weights, hash_local_source_ahead
from requant.tasks.calibration import prepare_calibration
from requant.tasks.evaluation import evaluate_baseline, evaluate_candidate
from requant.tasks.gate import record_gate
from requant.tasks.preflight import preflight, preflight_candidates
from requant.tasks.publish import publish
from requant.tasks.quantization import fit_recipe, plan_quantization_memory, quantize
from requant.tasks.source import resolve_source


@flow(name="requantize", log_prints=True)
def requantize(request: RunRequest = RunRequest()) -> dict[str, Any]:
    """Quantize a Hugging Face causal LM to a verified W8A8 checkpoint, evaluate it as vLLM serves
    it against its source, gate it, and publish it to the Hub (or a dry run). With
    ``search.candidates``, several candidates against one baseline, the best that passes wins.
    The run chooses only its request; the worker's profile says everything else (docs/trust.md)."""
    started = time.perf_counter()
    request = validate_request(request)
    settings = settings_for(request)
    hash_local_source_ahead(settings.source)  # while preflight imports torch and checks
    recipe, acc = preflight(settings)
    trials = preflight_candidates(settings, acc) if settings.search.candidates else []
    check_gpu_limit(settings.quantization.gpus)
    source = resolve_source(settings.source)
    recipe = fit_recipe(recipe, source)
    trials = [(c, s, fit_recipe(r, source)) for c, s, r in trials]
    plan_quantization_memory(settings, source, recipe, acc)  # refused here if it cannot fit
    run_id = str(flow_run.get_id() or datetime.now(UTC).strftime("local-%Y%m%dT%H%M%SZ"))
    run_dir = RunDir.create(settings.output_dir, run_id)  # only once the inputs are sound
    get_run_logger().info("run directory: %s", run_dir.root)
    with failure_recorded(run_dir, run_id, started):  # every run leaves where and why
        calib = (prepare_calibration(settings.calibration, source, settings.cache_dir,
                                     run_dir.stage("calibration"))
                 if recipe.needs_calibration_data
                 or any(r.needs_calibration_data for _, _, r in trials) else None)
        if source.revision is None:
            # A local folder is identified by every file's bytes, weights included; hashed here
            # once, quantization reuses it. (A Hub commit pins its weights.)
            source = fetch_weights(settings.source, source)
            get_run_logger().info("source identified by its bytes (%d files)",
                                  len(source.files))
        fp = calib.fingerprint if calib else None
        key = candidate_key(settings, source.files, source.revision, recipe.sha256, fp)
        entries = [Entry(c, s, r, candidate_key(s, source.files, source.revision, r.sha256, fp),
                         Outcome(c.name, c.changes(), i)) for i, (c, s, r) in enumerate(trials)]
        keys = [e.key for e in entries] or [key]  # a search's winner is published under its own
        if not settings.force and (hit := next(filter(None, (
                find_published(settings.cache_dir, k) for k in keys)), None)):
            return finish_published(settings, request, run_dir, run_id, hit, started)
        if entries:
            return search_and_promote(settings, request, source, calib, entries, acc, run_dir,
                                      started)
        return single_candidate(RunContext(settings, request, run_dir, run_id, started),
                                source, calib, recipe, acc, key)


@dataclass(frozen=True)
class RunContext:
    """What every stage after the run directory needs to know about its run."""

    settings: PipelineSettings
    request: RunRequest
    run_dir: RunDir
    run_id: str
    started: float


def single_candidate(run: RunContext, source: ResolvedSource, calib: CalibrationSet | None,
                     recipe: ResolvedRecipe, acc: Accelerator, key: str) -> dict[str, Any]:
    """One candidate: quantize and gate it on the GPUs, then publish and promote it or fail."""
    settings, request, run_dir, run_id, started = (run.settings, run.request, run.run_dir,
                                                   run.run_id, run.started)
    t_gpu = time.perf_counter()
    # Held while a run uses its GPUs (quantization + evaluation): the limit counts GPUs, so runs
    # wait for as many free ones as they use, then proceed (requant.gpu_limit).
    with gpu_slots(settings.quantization.gpus, run_dir.root, get_run_logger().info):
        ckpt, decision, timings = gpu_stages(settings, source, calib, recipe, acc, run_dir,
                                             run_id)
    summary = build_summary(run_id, run_dir.root, ckpt, source, recipe, calib, key, decision,
                            {"prepare": round(t_gpu - started, 2), **timings,
                             "flow": round(time.perf_counter() - started, 2)})
    if decision is None:
        get_run_logger().warning("evaluation.enabled=false: no gate decision, so nothing is "
                                 "published")
    elif not decision.promote:
        finish(run_dir, summary)
        emit_gate_event(settings, request, summary, passed=False)
        raise GateFailed(decision)  # nothing was published: the stage below never ran
    else:
        publish_and_promote(settings, request, run_dir, ckpt, decision, summary, key, started)
    summary["timings_s"]["flow"] = round(time.perf_counter() - started, 2)
    finish(run_dir, summary)
    get_run_logger().info("done: checkpoint %s (verified), summary %s", ckpt.path,
                          run_dir.root / "summary.json")
    return summary


def search_and_promote(settings: PipelineSettings, request: RunRequest, source: ResolvedSource,
                       calib: CalibrationSet | None, entries: list[Entry], acc: Accelerator,
                       run_dir: RunDir, started: float) -> dict[str, Any]:
    """The search (flows/search.py), then the winner goes the way a single candidate goes; no
    winner fails the run with the table, nothing published."""
    t_gpu = time.perf_counter()
    with gpu_slots(settings.quantization.gpus, run_dir.root, get_run_logger().info):
        found = run_search(settings, source, calib, entries, acc, run_dir)
    run_id = run_dir.root.name
    timings = {"prepare": round(t_gpu - started, 2), **found.timings}
    if found.winner is None:
        summary = {"run_id": run_id, "run_dir": str(run_dir.root), "no_op": False,
                   "checkpoint": None, "source": source.as_record(), "gate": None,
                   "search": found.record, "candidate_key": None, "publish": None,
                   "rollout": None, "timings_s": timings
                   | {"flow": round(time.perf_counter() - started, 2)}}
        write_json_atomic(run_dir.root / "summary.json", summary)
        emit_gate_event(settings, request, summary, passed=False)
        raise GateFailed(NoWinner(found.record))
    w = found.winner
    assert w.ckpt is not None and w.decision is not None
    get_run_logger().info("search: %s wins (objective %s)", w.candidate.name,
                          settings.search.objective)
    summary = build_summary(run_id, run_dir.root, w.ckpt, source, w.recipe, calib, w.key,
                            w.decision, timings | {"flow": round(time.perf_counter() - started,
                                                                 2)})
    summary["search"] = found.record
    publish_and_promote(w.settings, request, run_dir, w.ckpt, w.decision, summary, w.key,
                        started, stages=candidate_dir(run_dir, w.candidate.name))
    summary["timings_s"]["flow"] = round(time.perf_counter() - started, 2)
    finish(run_dir, summary)
    return summary


@dataclass
class NoWinner:
    """The gate's refusal of a whole search: every candidate's why."""

    record: dict[str, Any]
    status: str = "fail"

    @property
    def reasons(self) -> list[str]:
        return [f"{o['name']}: {o['status']} ({o['why'] or 'no reason recorded'})"
                for o in self.record["outcomes"]]


def gpu_stages(
    settings: PipelineSettings, source: ResolvedSource, calib: CalibrationSet | None,
    recipe: ResolvedRecipe, acc: Accelerator, run_dir: RunDir, run_id: str,
) -> tuple[QuantizedCheckpoint, GateDecision | None, dict[str, float]]:
    """The baseline's first stage first (cached), so a source that cannot do the task costs no
    quantization; then quantization; then the candidate, staged, until the gate's decision is
    clear (the baseline answering more stages only if the candidate needs them)."""
    ev, on_gpu, eval_dir = settings.evaluation, acc.kind == "cuda", run_dir.stage("eval")
    t0 = time.perf_counter()
    baseline = None
    if ev.enabled:
        source = fetch_weights(settings.source, source)
        baseline = evaluate_baseline(ev, settings.gate, source.as_record(), source.path,
                                     settings.cache_dir, eval_dir / "baseline", on_gpu)
    t1 = time.perf_counter()
    ckpt = quantize(settings, source, calib, recipe, acc, run_dir.stage("checkpoint"),
                    {"flow_run_id": run_id, "flow_run_name": flow_run.get_name()})
    t2 = time.perf_counter()
    decision = None
    if baseline is not None:
        candidate, decision, baseline = evaluate_candidate(
            ev, settings.gate, baseline, ckpt.path, eval_dir / "candidate", on_gpu,
            source.as_record(), source.path, settings.cache_dir)
        record_gate(decision, baseline, candidate, run_dir.stage("gate"),
                    noise_for_source(settings.cache_dir, source.as_record(), ev, settings.gate,
                                     on_gpu))
    return ckpt, decision, {"evaluate_baseline": round(t1 - t0, 2),
                            "quantize": round(t2 - t1, 2),
                            "evaluate_candidate_and_gate": round(time.perf_counter() - t2, 2)}


def publish_and_promote(settings: PipelineSettings, request: RunRequest, run_dir: RunDir,
                        ckpt: QuantizedCheckpoint, decision: GateDecision,
                        summary: dict[str, Any], key: str, started: float,
                        stages: RunDir | None = None) -> None:
    """Publish (retried on transient errors only), record it in the ledger, announce the gate's
    pass, then roll out inline / through the promote deployment, or leave it to the automation.
    ``stages``: where the evaluation and gate records are (a search's winner's own folder)."""
    stages = stages or run_dir
    # the record so far, on disk: a failure from here on adds its stage and why to it
    write_json_atomic(run_dir.root / "summary.json", summary)
    gate = decision.as_record() | ({"search": summary["search"]} if summary.get("search")
                                   else {})
    published = publish.with_options(
        retries=settings.hub.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.hub.retry_delay_s)
        if settings.hub.retry_delay_s else 0,
    )(settings.hub, ckpt.path, stages.stage("eval"), stages.stage("gate"), ckpt.manifest,
      gate, run_dir.stage("publish"))
    summary["publish"] = published.as_record()
    summary["timings_s"]["publish"] = round(
        time.perf_counter() - started - summary["timings_s"]["flow"], 2)
    record_published(settings.cache_dir, key, summary["run_id"],
                     summary["publish"] | {"checkpoint": str(ckpt.path)}, summary["gate"])
    emit_gate_event(settings, request, summary, passed=True)
    if settings.rollout.target == "none":
        return
    if settings.rollout.trigger == "automation":
        summary["rollout"] = {"trigger": "automation", "event": "requant.gate.passed"}
        return
    try:
        summary["rollout"] = run_promote(settings, request, promote_args(summary))
    except RolloutFailed as exc:
        summary["rollout"] = {"failed": str(exc)}
        finish(run_dir, summary)
        raise


def run_promote(settings: PipelineSettings, request: RunRequest,
                args: dict[str, str]) -> dict[str, Any]:
    """inline: the promote flow as a subflow. deployment: the promote deployment on its own
    (serving) pool, where the vLLM environment lives; this run waits for its outcome. Either
    way the promote run composes the same request with the same profile."""
    if settings.rollout.trigger == "inline":
        from requant.flows.promote import promote

        return promote(request, **args)
    from prefect.deployments import run_deployment

    child = run_deployment(settings.rollout.promote_deployment,
                           parameters={"request": request.model_dump(mode="json"), **args},
                           timeout=None, as_subflow=True)
    if not child.state or not child.state.is_completed():
        from requant.rollout.state import Release

        raise RolloutFailed(Release(args.get("revision") or args.get("checkpoint", "")),
                            "promote", f"promote flow run {child.id} ended "
                            f"{child.state.type.value if child.state else 'without a state'}")
    return {"trigger": "deployment", "promote_flow_run": str(child.id),
            "state": child.state.type.value}


def promote_args(summary: dict[str, Any]) -> dict[str, str]:
    """What the promote flow deploys: the published commit, or the local checkpoint (dry run)."""
    p = summary["publish"]
    if p and not p["dry_run"] and p["commit_sha"]:
        return {"revision": p["commit_sha"]}
    return {"checkpoint": summary["checkpoint"]}


def emit_gate_event(settings: PipelineSettings, request: RunRequest, summary: dict[str, Any],
                    passed: bool) -> None:
    """requant.gate.passed / .failed: what an automation (promote) or a notification needs."""
    model = settings.hub.repo_id or summary["source"]["model"]
    emit_event(
        event=f"requant.gate.{'passed' if passed else 'failed'}",
        resource={"prefect.resource.id": f"requant.model.{model}",
                  "prefect.resource.name": model,
                  # what the promote automation matches on (prefect.yaml): only runs that
                  # leave promotion to it
                  "requant.promote": settings.rollout.trigger
                  if settings.rollout.target != "none" else "none"},
        related=[{"prefect.resource.id": f"prefect.flow-run.{summary['run_id']}",
                  "prefect.resource.role": "flow-run"}],
        payload=gate_payload(settings, request, summary, passed),
    )


def gate_payload(settings: PipelineSettings, request: RunRequest, summary: dict[str, Any],
                 passed: bool) -> dict[str, Any]:
    """The gate event's payload, as strings ("" when absent) so templated deployment parameters
    render cleanly (the promote flow takes "" as unset)."""
    gate = summary["gate"] or {}
    p = summary["publish"] or {}
    args = promote_args(summary) if passed else {}
    return {
        "repo_id": settings.hub.repo_id or "", "revision": args.get("revision", ""),
        "checkpoint": args.get("checkpoint", ""), "tag": p.get("tag") or "",
        "dry_run": str(bool(p.get("dry_run", True))).lower(),
        "status": gate.get("status", ""),
        "recovery": ",".join(str(r.get("recovery")) for r in gate.get("rules", [])),
        "run_id": summary["run_id"], "source": summary["source"]["model"],
        # a search's table: every candidate's decision and why (empty without a search)
        "candidates": table_rows(summary["search"]) if summary.get("search") else [],
        # the run's own request (never the profile's settings), so the promote run composes
        # the same hub and rollout settings from the same profile
        "request": request.model_dump(mode="json"),
    }


def finish_published(settings: PipelineSettings, request: RunRequest, run_dir: RunDir,
                     run_id: str, hit: dict[str, Any], started: float) -> dict[str, Any]:
    """This exact candidate was published before: nothing to do, or, when it does not serve on
    the configured target, its rollout (no requantization)."""
    if settings.rollout.target != "none":
        args, why = pending_rollout(hit, load_state(settings.rollout.state_dir,
                                                    settings.rollout.target))
        if args is not None:
            return promote_published(settings, request, run_dir, run_id, hit, args, why,
                                     started)
    return finish_no_op(run_dir, run_id, hit["candidate_key"], hit, started)


def finish_no_op(run_dir: RunDir, run_id: str, key: str, hit: dict[str, Any],
                 started: float) -> dict[str, Any]:
    where = (f"`{hit['repo_id']}` @ `{hit['commit_sha']}` (tag `{hit['tag']}`)"
             if not hit.get("dry_run") else f"a dry run (`{hit.get('checkpoint')}`)")
    summary = {"run_id": run_id, "run_dir": str(run_dir.root), "no_op": True,
               "candidate_key": key, "already_published": hit,
               "timings_s": {"flow": round(time.perf_counter() - started, 2)}}
    write_json_atomic(run_dir.root / "summary.json", summary)
    create_markdown_artifact(key="requant-run-summary", markdown=render_no_op(summary, where))
    get_run_logger().info("no-op: candidate %s already published (%s); nothing to do",
                          key[:16], where)
    return summary


def promote_published(settings: PipelineSettings, request: RunRequest, run_dir: RunDir,
                      run_id: str, hit: dict[str, Any], args: dict[str, str], why: str,
                      started: float) -> dict[str, Any]:
    """The candidate passed the gate and was published by an earlier run, but does not serve
    on the configured target: roll it out now, the same way that run would have."""
    key = hit["candidate_key"]
    get_run_logger().info("candidate %s already published by run %s, %s: rolling out %s",
                          key[:16], hit.get("run_id"), why, args)
    summary: dict[str, Any] = {"run_id": run_id, "run_dir": str(run_dir.root), "no_op": False,
                               "candidate_key": key, "already_published": hit,
                               "promoted_published": {"why": why, **args}}
    try:
        summary["rollout"] = run_promote(settings, request, args)
    except RolloutFailed as exc:
        summary["rollout"] = {"failed": str(exc)}
        raise
    finally:
        summary["timings_s"] = {"flow": round(time.perf_counter() - started, 2)}
        write_json_atomic(run_dir.root / "summary.json", summary)
        create_markdown_artifact(key="requant-run-summary", markdown=(
            f"# requant run {run_id}: rollout of an already published candidate\n\n"
            f"Candidate `{key[:16]}` was published by run `{hit.get('run_id')}` and {why}; "
            f"promoted {args} without requantizing: "
            f"`{json.dumps(summary.get('rollout'), default=str)[:500]}`\n"))
    return summary


@contextmanager
def failure_recorded(run_dir: RunDir, run_id: str, started: float) -> Iterator[None]:
    """Whatever stops the run (a refused gate, an error in any stage, a cancellation), its
    summary.json says where and why: the summary written so far, with ``failure`` added."""
    try:
        yield
    except BaseException as exc:
        path = run_dir.root / "summary.json"
        try:
            summary = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            summary = {}
        summary = {"run_id": run_id, "run_dir": str(run_dir.root), "no_op": False} | summary
        summary["failure"] = failure_record(exc)
        summary.setdefault("timings_s", {})["flow"] = round(time.perf_counter() - started, 2)
        write_json_atomic(path, summary)
        with suppress(Exception):  # the record on disk matters; the UI's copy is best effort
            create_markdown_artifact(key="requant-run-summary", markdown=render_failure(summary))
        raise


def finish(run_dir: RunDir, summary: dict[str, Any]) -> None:
    write_json_atomic(run_dir.root / "summary.json", summary)
    create_markdown_artifact(key="requant-run-summary", markdown=render_summary(summary))
