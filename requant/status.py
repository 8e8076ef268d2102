"""``requant status``: what serves where, whether it is alive, and what the last runs decided.

Read-only and quick: every probe has a short timeout, and a probe that cannot answer says so
("unreachable") rather than guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from requant.rollout.state import Deployed, load_state
from requant.runs import last_published, list_runs
from requant.settings import PipelineSettings


def collect_status(settings: PipelineSettings, recent: int = 5) -> dict[str, Any]:
    target = settings.rollout.target
    serving: dict[str, Any] = {"target": target}
    if (read := _SERVING.get(target)) is not None:
        serving |= read(settings)
    return {"serving": serving, "last_published": last_published(settings.cache_dir),
            "runs": [run_line(r.run_id, r.path, r.summary)
                     for r in list_runs(settings.output_dir)[:recent]]}


def _deployed(d: Deployed | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"revision": d.release.revision, "repo_id": d.release.repo_id,
            "since": d.deployed_at, "flow_run_id": d.flow_run_id, "endpoint": d.endpoint,
            "marker": d.marker, "forced": d.forced, "rollback": d.rollback}


def local_status(settings: PipelineSettings) -> dict[str, Any]:
    from requant.rollout.local import router_status, router_url

    state = load_state(settings.rollout.state_dir, "local")
    url = router_url(settings)
    router = router_status(url, timeout_s=2)
    active = state.active
    return {"endpoint": f"{url}/v1", "active": _deployed(active),
            "previous": _deployed(state.previous), "pending": _deployed(state.pending),
            "withdrawn": state.withdrawn,
            "router": {"alive": router is not None, "url": url, "status": router,
                       "supervisor": _supervisor(settings)},
            "server": _server(active, settings.rollout.served_model_name),
            "guardian": _guardian(settings)}


def _guardian(settings: PipelineSettings) -> dict[str, Any]:
    """Who starts the keeper again if it dies: the guardian's own word and its supervisor's."""
    from requant.rollout.guardian import read_status
    from requant.serving.supervision import supervision

    folder = Path(settings.rollout.state_dir) / "local"
    said = read_status(folder) or {}
    running = settings.rollout.local.supervisor == "external" or \
        supervision(folder, "guardian").state == "RUNNING"
    return {"running": running, "state": said.get("state"), "why": said.get("why"),
            "fix": said.get("fix"), "restarts": said.get("restarts", 0),
            "last": said.get("last")}


def _server(active: Deployed | None, served_name: str) -> dict[str, Any]:
    """The process asked, not the record: is the recorded pid (the keeper) alive, does the
    server answer now, and what the keeper says of its restarts."""
    import httpx

    from requant.processes import pid_running
    from requant.serving.checks import not_ready_reason
    from requant.serving.keeper import read_status

    if active is None or not active.server.get("pid"):
        return {"pid": None, "alive": False, "answers": False}
    pid = int(active.server["pid"])
    alive = pid_running(pid)
    with httpx.Client(timeout=2) as client:
        why = not_ready_reason(client, active.server.get("url", ""), served_name) if alive \
            else "not running"
    keeper = read_status(active.server.get("keeper")) if alive else None
    return {"pid": pid, "alive": alive, "answers": why is None, "not_ready": why,
            "keeper": keeper and {k: keeper.get(k) for k in
                                  ("state", "server_pid", "restarts", "last_exit",
                                   "ready_since")}}


def _supervisor(settings: PipelineSettings) -> dict[str, str]:
    from requant.serving.supervision import supervision

    if settings.rollout.local.supervisor == "external":
        return {"state": "external", "detail": "rollout.local.supervisor (e.g. systemd)"}
    return vars(supervision(Path(settings.rollout.state_dir) / "local"))


def kubernetes_status(settings: PipelineSettings) -> dict[str, Any]:
    """The Deployment's annotations are the truth; the local record is an audit copy."""
    from requant.rollout.k8s_manifest import ANNOTATION
    from requant.rollout.kubernetes import api_client, read_deployment

    k = settings.rollout.kubernetes
    local = load_state(settings.rollout.state_dir, "kubernetes")
    out: dict[str, Any] = {"namespace": k.namespace, "deployment": k.deployment,
                           "recorded": _deployed(local.active), "withdrawn": local.withdrawn}
    try:
        from kubernetes import client

        if k.router.enabled:
            from requant.rollout.kubernetes_router import routed_status

            out["cluster"] = {"reachable": True, "router": routed_status(k)}
            return out
        dep = read_deployment(client.AppsV1Api(api_client(k)), k)
    except Exception as exc:  # a status command reports an unreachable cluster, never crashes
        out["cluster"] = {"reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return out
    if dep is None:
        out["cluster"] = {"reachable": True, "deployment": None}
        return out
    notes = (dep.get("metadata") or {}).get("annotations") or {}
    st = dep.get("status") or {}
    out["cluster"] = {"reachable": True,
                      "annotations": {key.split("/", 1)[1]: v for key, v in notes.items()
                                      if key.startswith(f"{ANNOTATION}/")},
                      "replicas": st.get("replicas"), "ready": st.get("readyReplicas")}
    return out


def run_line(run_id: str, path: Path, summary: dict[str, Any] | None) -> dict[str, Any]:
    if summary is None:
        if waiting := _waiting_for_gpus(path):
            return {"run_id": run_id, "path": str(path), "state": waiting}
        return {"run_id": run_id, "path": str(path), "state": "no summary (failed or running)"}
    if summary.get("no_op"):
        return {"run_id": run_id, "path": str(path), "state": "no-op (already published)"}
    gate = summary.get("gate") or {}
    publish = summary.get("publish") or {}
    search = summary.get("search") or {}
    line = {"run_id": run_id, "path": str(path), "state": "finished",
            "gate": gate.get("status") or ("fail" if search else None),
            "promote": gate.get("promote"),
            "publish": ("dry run" if publish.get("dry_run") else publish.get("commit_sha"))
            if publish else None,
            **({"search": {"winner": search.get("winner"), "objective": search["objective"],
                           "candidates": search["candidates"]}} if search else {})}
    if failure := summary.get("failure"):  # what the gate and a search said stays on the line
        stage = f" in {failure['stage']}" if failure.get("stage") else ""
        line |= {"state": f"FAILED{stage}: {failure['error']} at {failure['where']}",
                 "why": failure["message"][:300]}
    return line


def _waiting_for_gpus(path: Path) -> str | None:
    from requant.gpu_limit import WAITING_MARK

    try:
        mark = json.loads((path / WAITING_MARK).read_text())
    except (OSError, ValueError):
        return None
    return (f"waiting for {mark.get('slots')} GPU slot(s) of '{mark.get('limit')}' since "
            f"{mark.get('since')} (other runs hold them; it starts when they finish)")


def render_status(status: dict[str, Any]) -> str:
    s = status["serving"]
    lines = [f"target: {s['target']}"]
    if s["target"] == "local":
        a = s["active"]
        sup = s["router"]["supervisor"]
        lines.append(f"endpoint: {s['endpoint']} (router "
                     f"{'up' if s['router']['alive'] else 'DOWN'}; supervisord: {sup['state']}"
                     f"{', ' + sup['detail'] if sup['detail'] else ''})")
        lines.append("serving: " + (f"{a['revision']} since {a['since']} ("
                                    f"{_server_words(s['server'])})" if a else "nothing"))
        if a:
            lines += _guardian_lines(s["server"], s["guardian"], a)
        if canary := (s["router"]["status"] or {}).get("canary"):
            lines.append(f"canary: {canary['revision']} answers {canary['weight']:.0%} of "
                         f"requests ({canary['url']}), a rollout's phase")
        if (s["router"]["status"] or {}).get("state_error"):
            lines.append(f"ROUTER STATE UNREADABLE: {s['router']['status']['state_error']}")
        lines += _marker_lines(a)
        if s["previous"]:
            lines.append(f"previous (rollback target): {s['previous']['revision']}")
        if s["pending"]:
            lines.append(f"unfinished rollout on record: {s['pending']['revision']}")
    elif s["target"] == "kubernetes" and (routed := s["cluster"].get("router")):
        lines += _routed_lines(s["namespace"], s["deployment"], routed)
        lines += _marker_lines(s["recorded"])
    elif s["target"] == "kubernetes":
        lines.append(f"deployment: {s['namespace']}/{s['deployment']}; cluster: {s['cluster']}")
        lines += _marker_lines(s["recorded"])
    if s.get("withdrawn"):
        lines.append(f"rolled back from (not rolled out again unless promoted): "
                     f"{', '.join(s['withdrawn'])}")
    last = status["last_published"]
    lines.append("last published: " + (f"{last.get('repo_id') or 'dry run'} @ "
                                       f"{last.get('commit_sha') or last.get('checkpoint')} "
                                       f"({last['published_at']}, run {last['run_id']})"
                                       if last else "nothing yet"))
    lines.append("recent runs:" if status["runs"] else "recent runs: none")
    for r in status["runs"]:
        extra = (f" gate {r['gate']}, {_published_words(r['publish'])}" if r.get("gate")
                 else "")
        if search := r.get("search"):
            extra += (f"; search of {search['candidates']} ({search['objective']}): winner "
                      f"{search['winner'] or 'none'}")
        lines.append(f"  {r['run_id']}: {r['state']}{',' if r.get('why') and extra else ''}"
                     f"{extra}")
        if r.get("why"):
            lines.append(f"    why: {r['why']}")
    return "\n".join(lines)


def _routed_lines(namespace: str, name: str, routed: dict[str, Any]) -> list[str]:
    serving = routed["serving_slot"]
    lines = [f"router {namespace}/{name}-router: serving "
             + (f"slot {serving} ({name}-{serving}) at {routed['revision']}" if serving
                else "NO SLOT (no rollout has set its backend since it started)")]
    for kind in ("shadow", "canary"):
        if phase := routed.get(kind):
            share = phase.get("weight", phase.get("share"))
            lines.append(f"{kind}: {phase['revision']} ({share:.0%}), a rollout's phase")
    for slot, dep in routed["slots"].items():
        lines.append(f"  slot {slot}: " + ("none" if dep is None else
                     f"{dep['revision']}, {dep['ready']}/{dep['replicas']} ready"))
    return lines


def _published_words(publish: str | None) -> str:
    """A run that published nothing says so, not "publish None"."""
    if publish is None:
        return "nothing published"
    return "published as a dry run" if publish == "dry run" else f"published {publish}"


def _marker_lines(active: dict[str, Any] | None) -> list[str]:
    """A serving revision the Hub's production marker has not caught up with is said loudly:
    readers of the marker get the revision before it until a promote moves it."""
    if not active or active.get("marker") != "pending":
        return []
    return [f"PRODUCTION MARKER NOT MOVED: {active['repo_id']}'s production branch does not "
            f"point at {active['revision']} yet (its move failed or was cut short). `requant "
            f"promote --revision {active['revision']}` moves it; nothing is rolled out again."]


def _guardian_lines(server: dict[str, Any], guardian: dict[str, Any],
                    active: dict[str, Any]) -> list[str]:
    """When the server is down: what is being done about it, and the command if a person must
    act; otherwise how often the guardian had to start the keeper again."""
    fix = guardian.get("fix") or "requant promote --rollback (or --checkpoint <the serving one>)"
    if guardian["state"] == "gave-up":
        return [f"GUARDIAN GAVE UP: {guardian['why']}. Fix: {fix}"]
    if not server["alive"]:
        if guardian["running"]:
            return ["the guardian is starting the keeper again (it checks every second); "
                    f"if it stays down: {fix}"]
        return [f"NOTHING RESTARTS IT: the guardian is not running. Fix: {fix}"]
    if guardian.get("restarts"):
        last = guardian.get("last") or {}
        return [f"guardian: started the keeper again {guardian['restarts']} time(s), last at "
                f"{last.get('at')}"]
    return []


def _server_words(server: dict[str, Any]) -> str:
    if not server["alive"]:
        return f"server pid {server['pid']} NOT RUNNING"
    keeper = server.get("keeper") or {}
    restarts = (f", restarted {keeper['restarts']} time(s), last exit "
                f"{(keeper.get('last_exit') or {}).get('code')}"
                if keeper.get("restarts") else "")
    answering = "answering" if server["answers"] else \
        f"NOT ANSWERING ({keeper.get('state') or server.get('not_ready')})"
    return f"server pid {server['pid']}, {answering}{restarts}"


#: What ``requant status`` reads of each target (``requant.rollout.targets``), read only.
_SERVING = {"local": local_status, "kubernetes": kubernetes_status}
