"""The main pipeline: source -> calibration -> quantization -> evaluation -> gate -> publish
-> rollout.

Reads like the diagram in docs/architecture.md. A gate that does not pass raises GateFailed
after recording its decision (and emitting ``requant.gate.failed``): the run fails and nothing
leaves the machine. A gate that passes publishes, emits ``requant.gate.passed`` with the commit,
and then either runs the promote flow itself (rollout.trigger=inline) or leaves that to the
Prefect automation listening for the event (rollout.trigger=automation, prefect.yaml).
A candidate identical to one already published (the candidate ledger) ends the run at once.

Run it:  python -m flows.requantize [--config deployments/configs/demo.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from requant.atomic import write_json_atomic
from requant.hardware import Accelerator, check_scheme_supported, detect_accelerator
from requant.ledger import candidate_key, find_published, record_published
from requant.recipes import ResolvedRecipe, resolve_recipe
from requant.rundir import RunDir
from requant.settings import PipelineSettings, SettingsError, load_settings, validate_settings
from tasks.calibration import prepare_calibration
from tasks.evaluation import evaluate_baseline, evaluate_candidate, validate_tasks
from tasks.gate import GateFailed, gate
from tasks.publish import check_publish_settings, publish
from tasks.quantization import quantize
from tasks.rollout import RolloutFailed
from tasks.serving import serving_python
from tasks.source import fetch_weights, resolve_source

#: Global concurrency limit held while a run uses the GPU (quantization + evaluation). Created
#: with limit 1 by scripts/prefect_apply.sh: a nightly and an on-demand run never share a GPU;
#: the later one waits for the slot, then proceeds. Absent (plain `python -m`): no limit.
GPU_LIMIT = "requant-gpu"


@task(name="preflight")
def preflight(settings: PipelineSettings) -> tuple[ResolvedRecipe, Accelerator]:
    """Every cheap check first: a bad recipe, an unservable scheme, an unknown lm-eval task or a
    missing serving environment fails in seconds, not after an hour of calibration."""
    recipe = resolve_recipe(settings.quantization)
    acc = detect_accelerator(settings.quantization.device)
    check_scheme_supported(recipe.scheme, acc)
    if settings.evaluation.enabled:
        serving_python(settings.evaluation.server)
        validate_tasks(settings.evaluation)
    check_publish_settings(settings.hub)
    if settings.rollout.target == "local":
        from tasks.rollout_local import check_local_settings

        check_local_settings(settings)
    get_run_logger().info("preflight ok: recipe %s (scheme %s, sha256 %s) on %s", recipe.origin,
                          recipe.scheme, recipe.sha256[:12], acc.name)
    return recipe, acc


@flow(name="requantize", log_prints=True)
def requantize(settings: PipelineSettings = PipelineSettings()) -> dict[str, Any]:
    """Quantize a Hugging Face causal LM to a verified W8A8 checkpoint, evaluate it as vLLM serves
    it against its source, gate it, and publish it to the Hub (or a dry run)."""
    logger = get_run_logger()
    started = time.perf_counter()
    settings = validate_settings(settings)
    run_id = flow_run.get_id() or datetime.now(UTC).strftime("local-%Y%m%dT%H%M%SZ")
    run_dir = RunDir.create(settings.output_dir, str(run_id))
    logger.info("run directory: %s", run_dir.root)

    recipe, acc = preflight(settings)
    source = resolve_source(settings.source)
    calib = (
        prepare_calibration(
            settings.calibration, source, settings.cache_dir, run_dir.stage("calibration")
        )
        if recipe.needs_calibration_data
        else None
    )
    if source.revision is None:
        # A local folder is identified by every file's bytes, weights included; hashed here
        # once, quantization reuses it. (A Hub commit pins its weights: fetched later, only
        # when the run is not a no-op.)
        source = fetch_weights(settings.source, source)
    key = candidate_key(settings, source.files, source.revision, recipe.sha256,
                        calib.fingerprint if calib else None)
    if not settings.force and (hit := find_published(settings.cache_dir, key)):
        return finish_no_op(run_dir, str(run_id), key, hit, started)

    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        t_gpu = time.perf_counter()
        ckpt = quantize(
            settings, source, calib, recipe, acc, run_dir.stage("checkpoint"),
            {"flow_run_id": str(run_id), "flow_run_name": flow_run.get_name()},
        )
        t_quantized = time.perf_counter()
        decision = None
        if settings.evaluation.enabled:
            on_gpu = acc.kind == "cuda"
            eval_dir = run_dir.stage("eval")
            baseline = evaluate_baseline(settings.evaluation, ckpt.manifest["source"],
                                         ckpt.source.path, settings.cache_dir,
                                         eval_dir / "baseline", on_gpu)
            candidate = evaluate_candidate(settings.evaluation, ckpt.path,
                                           eval_dir / "candidate", on_gpu)
            decision = gate(baseline, candidate, settings.gate, run_dir.stage("gate"))
    stages = {"prepare": round(t_gpu - started, 2), "quantize": round(t_quantized - t_gpu, 2),
              "evaluate_and_gate": round(time.perf_counter() - t_quantized, 2)}

    summary = {
        "run_id": str(run_id),
        "run_dir": str(run_dir.root),
        "checkpoint": str(ckpt.path),
        "source": source.as_record() | {"files": len(ckpt.manifest["source"]["files"])},
        "recipe": {"origin": recipe.origin, "scheme": recipe.scheme, "sha256": recipe.sha256},
        "calibration": calib.as_record() if calib else None,
        "inputs_fingerprint": ckpt.manifest["inputs_fingerprint"],
        "verification": ckpt.manifest["verification"],
        "timings_s": ckpt.manifest["timings_s"] | stages
        | {"flow": round(time.perf_counter() - started, 2)},
        "peak_memory_gib": ckpt.manifest["peak_memory_gib"],
        "manifest_run": ckpt.manifest["run"],
        "candidate_key": key,
        "gate": decision.as_record() if decision else None,
        "publish": None,
        "rollout": None,
    }
    if decision is None:
        logger.warning("evaluation.enabled=false: no gate decision, so nothing is published")
        finish(run_dir, summary)
        return summary
    if not decision.promote:
        finish(run_dir, summary)
        emit_gate_event(settings, summary, passed=False)
        raise GateFailed(decision)  # nothing was published: the stage below never ran

    published = publish.with_options(
        retries=settings.hub.retries,  # transient errors only (publish's retry condition)
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.hub.retry_delay_s)
        if settings.hub.retry_delay_s else 0,
    )(settings.hub, ckpt.path, run_dir.stage("eval"), run_dir.stage("gate"), ckpt.manifest,
      decision.as_record(), run_dir.stage("publish"))
    summary["publish"] = published.as_record()
    summary["timings_s"]["publish"] = round(
        time.perf_counter() - started - summary["timings_s"]["flow"], 2)
    record_published(settings.cache_dir, key, str(run_id),
                     summary["publish"] | {"checkpoint": str(ckpt.path)}, summary["gate"])
    emit_gate_event(settings, summary, passed=True)
    if settings.rollout.target != "none" and settings.rollout.trigger != "automation":
        try:
            summary["rollout"] = run_promote(settings, promote_args(summary))
        except RolloutFailed as exc:
            summary["rollout"] = {"failed": str(exc)}
            finish(run_dir, summary)
            raise
    elif settings.rollout.target != "none":
        summary["rollout"] = {"trigger": "automation", "event": "requant.gate.passed"}
    summary["timings_s"]["flow"] = round(time.perf_counter() - started, 2)
    finish(run_dir, summary)
    logger.info("done: checkpoint %s (verified), summary %s", ckpt.path,
                run_dir.root / "summary.json")
    return summary


def run_promote(settings: PipelineSettings, args: dict[str, str]) -> dict[str, Any]:
    """inline: the promote flow as a subflow. deployment: the promote deployment on its own
    (serving) pool, where the vLLM environment lives; this run waits for its outcome."""
    if settings.rollout.trigger == "inline":
        from flows.promote import promote

        return promote(settings, **args)
    from prefect.deployments import run_deployment

    child = run_deployment(settings.rollout.promote_deployment,
                           parameters={"settings": settings.model_dump(mode="json"), **args},
                           timeout=None, as_subflow=True)
    if not child.state or not child.state.is_completed():
        from requant.deploy_state import Release

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


def emit_gate_event(settings: PipelineSettings, summary: dict[str, Any], passed: bool) -> None:
    """requant.gate.passed / .failed: what an automation (promote) or a notification needs,
    as strings ("" when absent) so templated deployment parameters render cleanly."""
    gate = summary["gate"] or {}
    p = summary["publish"] or {}
    model = settings.hub.repo_id or summary["source"]["model"]
    args = promote_args(summary) if passed else {}
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
        payload={
            "repo_id": settings.hub.repo_id or "", "revision": args.get("revision", ""),
            "checkpoint": args.get("checkpoint", ""), "tag": p.get("tag") or "",
            "dry_run": str(bool(p.get("dry_run", True))).lower(),
            "status": gate.get("status", ""), "recovery": str(gate.get("recovery")),
            "run_id": summary["run_id"], "source": summary["source"]["model"],
            # the run's own settings (no secret is ever a setting), so the promote run uses
            # the same hub and rollout settings as the run that passed the gate
            "settings": settings.model_dump(mode="json"),
        },
    )


def finish_no_op(run_dir: RunDir, run_id: str, key: str, hit: dict[str, Any],
                 started: float) -> dict[str, Any]:
    where = (f"`{hit['repo_id']}` @ `{hit['commit_sha']}` (tag `{hit['tag']}`)"
             if not hit.get("dry_run") else f"a dry run (`{hit.get('checkpoint')}`)")
    summary = {"run_id": run_id, "run_dir": str(run_dir.root), "no_op": True,
               "candidate_key": key, "already_published": hit,
               "timings_s": {"flow": round(time.perf_counter() - started, 2)}}
    write_json_atomic(run_dir.root / "summary.json", summary)
    create_markdown_artifact(key="requant-run-summary", markdown="\n".join([
        "# requant run: nothing to do",
        f"- this exact candidate (key `{key[:16]}`) was already published as {where} by run "
        f"`{hit['run_id']}` at {hit['published_at']}",
        "- same source revision, recipe, calibration set, settings and library versions: "
        "quantizing and evaluating again would only reproduce it",
        "- set `force: true` to run every stage anyway",
        f"- time: {summary['timings_s']['flow']} s",
    ]))
    get_run_logger().info("no-op: candidate %s already published (%s); nothing to do",
                          key[:16], where)
    return summary


def finish(run_dir: RunDir, summary: dict[str, Any]) -> None:
    write_json_atomic(run_dir.root / "summary.json", summary)
    create_markdown_artifact(key="requant-run-summary", markdown=render_summary(summary))


def render_summary(summary: dict[str, Any]) -> str:
    t = summary["timings_s"]
    v = summary["verification"]
    calib = summary["calibration"]
    calib_line = (
        f"{calib['stats']['samples']} samples, {calib['stats']['total_tokens']} tokens "
        f"(fingerprint `{calib['fingerprint'][:12]}`)" if calib else "none (data-free recipe)"
    )
    return "\n".join([
        "# requant run",
        f"- **source**: `{summary['source']['model']}` @ "
        f"`{summary['source']['revision'] or 'local'}`",
        f"- **recipe**: {summary['recipe']['origin']} ({summary['recipe']['scheme']})",
        f"- **calibration**: {calib_line}",
        f"- **checkpoint**: `{summary['checkpoint']}`",
        f"- **verification**: {'passed' if v['ok'] else 'FAILED'}; {v['quantized_linear']} Linear "
        f"layers quantized, ignored {v['ignored_linear']}, reload "
        f"{'ok' if v['reload_ok'] else v['reload_ok']}",
        f"- **time**: oneshot {t['oneshot']} s, flow {t['flow']} s; peak RSS "
        f"{summary['peak_memory_gib']['host_rss']} GiB",
        "- **stages (s)**: " + ", ".join(
            f"{k} {t[k]}" for k in ("prepare", "quantize", "evaluate_and_gate", "publish")
            if k in t),
        gate_line(summary["gate"]),
        publish_line(summary["publish"]),
        rollout_line(summary.get("rollout")),
    ])


def rollout_line(r: dict[str, Any] | None) -> str:
    if r is None:
        return "- **rollout**: none (rollout.target=none, or nothing was published)"
    if "failed" in r:
        return f"- **rollout**: ROLLED BACK, the previous revision keeps serving: {r['failed']}"
    if r.get("trigger") == "automation":
        return "- **rollout**: left to the automation on `requant.gate.passed` (promote)"
    if r.get("trigger") == "deployment":
        return f"- **rollout**: promote flow run `{r['promote_flow_run']}`: {r['state']}"
    d = r["deployed"]
    return (f"- **rollout**: {r['target']}: serving `{d['release']['revision']}` at "
            f"`{d['endpoint']}`{'' if r['changed'] else ' (already serving)'}; production "
            f"marker {'moved' if r['production_marker_moved'] else 'n/a (dry run)'}")


def publish_line(p: dict[str, Any] | None) -> str:
    if p is None:
        return "- **publish**: nothing published"
    if p["dry_run"]:
        return f"- **publish**: DRY RUN, nothing was published (record: `{p['folder']}`)"
    state = "already published, no new commit" if p["no_op"] else "committed"
    return f"- **publish**: {state}: `{p['repo_id']}` @ `{p['commit_sha']}`, tag `{p['tag']}`"


def gate_line(g: dict[str, Any] | None) -> str:
    if g is None:
        return "- **gate**: not run (evaluation.enabled=false)"
    rec = f"{g['recovery']:.4f}" if g["recovery"] is not None else "n/a"
    return (f"- **gate**: {g['status']} ({'promote' if g['promote'] else 'stop'}); "
            f"{g['task']} {g['metric']}: baseline {g['baseline_score']:.4f}, candidate "
            f"{g['candidate_score']:.4f}, recovery {rec}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.requantize", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings YAML (default: the embedded demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override one setting (repeatable)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = requantize(settings)
    except (GateFailed, RolloutFailed) as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    if summary.get("no_op"):
        print(f"\nnothing to do: this candidate was already published "
              f"({summary['already_published']['run_id']}); --set force=true to redo it")
        return 0
    print(f"\ncheckpoint: {summary['checkpoint']}\nrun directory: {summary['run_dir']}")
    if summary["gate"]:
        print(gate_line(summary["gate"]).replace("- **gate**", "gate"))
    print(publish_line(summary["publish"]).replace("- **publish**", "publish"))
    print(rollout_line(summary["rollout"]).replace("- **rollout**", "rollout"))
    if summary["rollout"] and summary["rollout"].get("target") == "local":
        print("  stop the local deployment with: make rollout-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
