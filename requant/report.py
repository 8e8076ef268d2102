"""What a person reads about a run: the summary artifact, the rollout artifact, the CLI lines.

Kept apart from the flows so the flows read like the pipeline diagram, and so the CLI and the
Prefect artifacts say the same thing in the same words.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from requant.errors import RolloutFailed
from requant.evaluation.gate import recovery_span
from requant.rollout.state import Deployed, Release
from requant.settings import PipelineSettings

if TYPE_CHECKING:
    from requant.calibration import CalibrationSet
    from requant.evaluation.gate import GateDecision
    from requant.quantization.checkpoint import QuantizedCheckpoint
    from requant.quantization.recipes import ResolvedRecipe
    from requant.source import ResolvedSource


def build_summary(run_id: str, run_dir: Path, ckpt: QuantizedCheckpoint, source: ResolvedSource,
                  recipe: ResolvedRecipe, calib: CalibrationSet | None, key: str,
                  decision: GateDecision | None, stages: dict[str, float]) -> dict[str, Any]:
    """summary.json: where everything a run made is, and what it decided."""
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt.path),
        "source": source.as_record() | {"files": len(ckpt.manifest["source"]["files"])},
        "recipe": {"origin": recipe.origin, "scheme": recipe.scheme, "sha256": recipe.sha256},
        "calibration": calib.as_record() if calib else None,
        "inputs_fingerprint": ckpt.manifest["inputs_fingerprint"],
        "verification": ckpt.manifest["verification"],
        "timings_s": ckpt.manifest["timings_s"] | stages,
        "peak_memory_gib": ckpt.manifest["peak_memory_gib"],
        "manifest_run": ckpt.manifest["run"],
        "candidate_key": key,
        "gate": decision.as_record() if decision else None,
        "publish": None,
        "rollout": None,
    }


#: The stage a failure happened in, by the code that raised it: the first pattern matched by
#: a frame of the traceback, innermost frame first for each pattern in this order (the
#: verification inside quantization before quantization; a task's file names its stage).
STAGE_OF_CODE = (
    ("/requant/quantization/verification.py", "verification"),
    ("/requant/evaluation/gate.py", "gate"), ("/tasks/gate.py", "gate"),
    ("/requant/calibration.py", "calibration"), ("/tasks/calibration.py", "calibration"),
    ("/requant/quantization/", "quantization"), ("/tasks/quantization.py", "quantization"),
    ("/requant/evaluation/", "evaluation"), ("/tasks/evaluation.py", "evaluation"),
    ("/requant/hub/", "publish"), ("/tasks/publish.py", "publish"),
    ("/requant/rollout/", "rollout"), ("/tasks/rollout.py", "rollout"),
    ("/requant/source.py", "source"), ("/tasks/source.py", "source"),
    ("/requant/preflight.py", "preflight"), ("/tasks/preflight.py", "preflight"),
)
#: Errors that name their stage whatever code raised them.
STAGE_OF_ERROR = {"GateFailed": "gate", "EvaluationStalled": "evaluation",
                  "RolloutFailed": "rollout",
                  "CheckpointVerificationError": "verification"}


def failure_record(exc: BaseException) -> dict[str, Any]:
    """Why and where a run stopped, from its exception: the error's class and message, the
    stage it stopped in, and the innermost frame of requant's own code (whatever library was
    below)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/requant/" in f.filename or "/flows/" in f.filename
            or "/tasks/" in f.filename] or frames
    where = ours[-1] if ours else None
    return {"error": type(exc).__name__, "stage": failed_stage(exc, ours),
            "message": str(exc)[:2000],
            "where": f"{Path(where.filename).name}:{where.lineno} in {where.name}"
            if where else None}


def failed_stage(exc: BaseException, frames: list[traceback.FrameSummary]) -> str:
    if type(exc).__name__ in STAGE_OF_ERROR:
        return STAGE_OF_ERROR[type(exc).__name__]
    for pattern, stage in STAGE_OF_CODE:
        if any(pattern in f.filename for f in frames):
            return stage
    return "flow"


def render_failure(summary: dict[str, Any]) -> str:
    f = summary["failure"]
    return (f"# requant run {summary['run_id']}: FAILED in {f.get('stage', 'the flow')}\n\n"
            f"- **error**: `{f['error']}` at "
            f"`{f['where']}`\n- **why**: {f['message'][:1000]}\n- **run directory**: "
            f"`{summary['run_dir']}`\n")


def render_no_op(summary: dict[str, Any], where: str) -> str:
    hit = summary["already_published"]
    return "\n".join([
        "# requant run: nothing to do",
        f"- this exact candidate (key `{summary['candidate_key'][:16]}`) was already published "
        f"as {where} by run `{hit['run_id']}` at {hit['published_at']}",
        "- same source revision, recipe, calibration set, settings and library versions: "
        "quantizing and evaluating again would only reproduce it",
        "- set `force: true` to run every stage anyway",
        f"- time: {summary['timings_s']['flow']} s",
    ])


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
        search_line(summary.get("search")),
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


def search_line(record: dict[str, Any] | None) -> str:
    if not record:
        return "- **candidates**: one (no search)"
    tried = ", ".join(f"{o['name']} {o['status']}" for o in record["outcomes"])
    return (f"- **search**: winner **{record['winner']}** by `{record['objective']}` of "
            f"{record['candidates']} ({tried}); each gated at "
            f"{record['candidate_confidence']:.2%} (the 'search' artifact has the table)")


def gate_line(g: dict[str, Any] | None) -> str:
    if g is None:
        return "- **gate**: not run (evaluation.enabled=false)"
    rules = "; ".join(
        f"{r['task']} {r['metric']} {r['status']} (" + (
            f"baseline {r['baseline_score']:.4f} vs candidate "
            f"{r['candidate_score']:.4f} on the same {r['questions']} questions, recovery "
            f"interval {recovery_span(r['interval'])})"
            if r["candidate_score"] is not None else "no candidate answers)")
        for r in g["rules"]) or "; ".join(g["reasons"])
    early = " (stopped early)" if g.get("stopped_early") else ""
    return (f"- **gate**: {g['status']} ({'promote' if g['promote'] else 'stop'}) after "
            f"{g['questions']} of {g['total']} candidate questions{early}; {rules}")


def render_rollout(settings: PipelineSettings, release: Release, deployed: Deployed | None,
                   changed: bool, failure: RolloutFailed | None = None) -> str:
    target = settings.rollout.target
    if failure is not None:
        lines = [f"# Rollout ROLLED BACK: {release.label()}", "",
                 f"- target: {target}", f"- failed check: **{failure.check}**",
                 f"- reason: {failure.reason}",
                 "- the previous revision keeps serving; the production marker did not move"]
        load = failure.report.get("load") or {}
    else:
        assert deployed is not None  # no failure: the target returned what it deployed
        lines = [f"# Rollout {'done' if changed else 'no-op (already serving)'}: "
                 f"{release.label()}", "", f"- target: {target}",
                 f"- endpoint: `{deployed.endpoint}` "
                 f"(model `{settings.rollout.served_model_name}`)",
                 f"- deployed at: {deployed.deployed_at}"]
        load = deployed.verification.get("load") or {}
        if "rollout_to_shift_s" in deployed.verification:
            shift = deployed.verification["rollout_to_shift_s"]
            lines.append(f"- start to traffic shifted: {shift} s")
    if load:
        lines += ["", "| load test | value |", "|---|---|",
                  *[f"| {key} | {load.get(key)} |" for key in
                    ("requests", "concurrency", "errors", "p50_s", "p95_s", "tokens_per_s")]]
    if phases := (deployed.verification.get("canary") if deployed else None):
        lines += ["", "| canary phase | weight | requests | 5xx (serving) | p95 s (serving) |",
                  "|---|---|---|---|---|",
                  *[f"| {c['phase']} | {c['weight']:.0%} | {c['requests']:.0f} | "
                    f"{c['error_rate']:.1%} ({c['serving_error_rate']:.1%}) | "
                    f"{c['p95_s']} ({c['serving_p95_s']}) |" for c in phases]]
    return "\n".join(lines)
