"""Local blue/green: vLLM servers on this host behind the stable router endpoint.

A rollout starts the new revision (green) beside the serving one (blue), verifies green directly
(readiness, smoke, load test against the SLOs), and only then switches the router. Blue finishes
the requests it already has (drain), then stops. Any failure before the switch stops green and
leaves the router, the deployed-state record and the Hub's production marker untouched: blue
never stopped serving, so a failed rollout costs clients nothing.

Servers and the router outlive the flow run that started them (they *are* the deployment), so
they are started detached and recorded by pid in the deployed state; a rollout that crashed
mid-way leaves a ``pending`` record that the next rollout reaps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from requant.errors import DeploymentCheckFailed, RolloutFailed, ServerError, SettingsError
from requant.processes import pid_running, stop_process_group
from requant.rollout.state import Deployed, DeployState, Release, load_state, save_state
from requant.serving.checks import verify_deployment
from requant.serving.server import log_tail, start_server, stop_server
from requant.settings import PipelineSettings

TARGET = "local"
Log = Callable[[str], None]


def check_local_settings(settings: PipelineSettings) -> None:
    if settings.rollout.local.server.port is not None:
        raise SettingsError(
            "rollout.local.server.port: must be unset. Blue/green runs the old and the new "
            "server side by side on free ports; clients use rollout.local.port (the router)."
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- the router (stable endpoint) -------------------------------------------------------------


def router_url(settings: PipelineSettings) -> str:
    cfg = settings.rollout.local
    return f"http://{cfg.host}:{cfg.port}"


def router_token(settings: PipelineSettings) -> str:
    """The router's admin token (a 0600 file beside its state), made on first use."""
    from requant.serving.router import load_or_create_token

    return load_or_create_token(Path(settings.rollout.state_dir) / TARGET / "router.token")


def router_status(url: str, timeout_s: float = 5) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/-/status", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def ensure_router(settings: PipelineSettings, log: Log) -> str:
    """The router answering on the stable endpoint: reuse the running one, or start it."""
    cfg = settings.rollout.local
    url = router_url(settings)
    if router_status(url) is not None:
        return url
    with socket.socket() as s:
        if s.connect_ex((cfg.host, cfg.port)) == 0:
            raise SettingsError(
                f"rollout.local.port: {cfg.host}:{cfg.port} is taken by something that is not a "
                "requant router. Stop it or choose another port."
            )
    folder = Path(settings.rollout.state_dir) / TARGET
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "router.log"
    router_token(settings)  # made here, 0600, before the router reads it
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "requant.serving.router", "--host", cfg.host,
             "--port", str(cfg.port), "--state-file", str(folder / "router.json"),
             "--token-file", str(folder / "router.token")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    (folder / "router.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while router_status(url) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the router did not start on {url}.\n{log_tail(log_path)}")
        time.sleep(0.2)
    log(f"router started on {url} (pid {proc.pid})")
    return url


def switch_router(url: str, backend: str, revision: str, token: str) -> dict[str, Any]:
    last: Exception | None = None
    for attempt in range(5):  # the admin call is local; a retry covers a momentary hiccup
        try:
            response = httpx.put(f"{url}/-/backend", json={"url": backend, "revision": revision},
                                 headers={"Authorization": f"Bearer {token}"}, timeout=10)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.5 * 2 ** attempt)
    raise RuntimeError(f"could not switch the router at {url}: {last}")


def drain(url: str, backend: str, timeout_s: float) -> int | None:
    """Wait until the router reports no request in flight to ``backend``; returns what was
    left, or None when the router could not be asked (never taken as drained: the whole
    timeout is waited out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = router_status(url)
        left = None if status is None else int(status.get("inflight", {}).get(backend, 0))
        if left is not None and left <= 0:
            return 0
        if time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def stop_router(settings: PipelineSettings) -> None:
    folder = Path(settings.rollout.state_dir) / TARGET
    pid_file = folder / "router.pid"
    if pid_file.is_file():
        stop_process_group(int(pid_file.read_text()), grace_s=10)
        pid_file.unlink()


# ---- the rollout ------------------------------------------------------------------------------


def _stop_deployed(d: Deployed | None, grace_s: float) -> None:
    if d is not None and d.server.get("pid"):
        stop_process_group(int(d.server["pid"]), grace_s)


def _server_alive(d: Deployed | None) -> bool:
    return bool(d and d.server.get("pid") and pid_running(int(d.server["pid"])))


def recover(settings: PipelineSettings, state: DeployState, url: str, flow_run_id: str | None,
            log: Log) -> None:
    """Finish what a killed rollout left, from what the router actually serves. The state is
    written ahead of every step (pending before the switch, active right after it), so:
    - pending, and the router already sends traffic to it: the flow died between the switch
      and its record. That server serves: record it active, then drain and stop the old one;
    - pending, router elsewhere: it never served; stop it (reaped);
    - the previous revision's server still running but not routed to: the flow died before
      stopping it after a switch; drain and stop it (rollback starts a fresh server anyway)."""
    grace = settings.rollout.local.server.stop_grace_s
    backend = (router_status(url) or {}).get("backend")
    pending = state.pending
    if pending is not None and backend == pending.server.get("url") and _server_alive(pending):
        log(f"recovering: {pending.release.label()} was switched to before the rollout that "
            "started it could record it; it serves")
        state.previous, state.active, state.pending = state.active, pending, None
        state.record_event("deployed", pending.release, flow_run_id, _now(),
                           "recovered: the router served it when its rollout was killed")
        save_state(settings.rollout.state_dir, state)
    elif pending is not None:
        log(f"reaping the unfinished rollout of {pending.release.label()}")
        _stop_deployed(pending, grace)
        state.record_event("reaped", pending.release, flow_run_id, _now(),
                           "left pending by an earlier rollout that did not finish")
        state.pending = None
        save_state(settings.rollout.state_dir, state)
    old = state.previous
    if old is not None and _server_alive(old) and backend != old.server.get("url"):
        drain(url, old.server.get("url", ""), settings.rollout.local.drain_timeout_s)
        log(f"stopping {old.release.label()}'s server, left running by a killed rollout")
        _stop_deployed(old, grace)


def rollout_local(settings: PipelineSettings, release: Release, flow_run_id: str | None,
                  log: Log = print) -> tuple[Deployed, bool]:
    """Blue/green to ``release``; returns (what now serves, whether anything changed)."""
    check_local_settings(settings)
    rcfg = settings.rollout
    cfg = rcfg.local
    state = load_state(rcfg.state_dir, TARGET)
    url = ensure_router(settings, log)  # a restarted router resumes its persisted backend
    recover(settings, state, url, flow_run_id, log)
    current = router_status(url) or {}
    if (state.active and state.active.release.revision == release.revision
            and _server_alive(state.active)
            and current.get("backend") == state.active.server.get("url")):
        log(f"{release.label()} is already serving at {url}; nothing to do")
        return state.active, False

    if not release.checkpoint or not Path(release.checkpoint).is_dir():
        raise SettingsError(f"release {release.label()}: checkpoint folder "
                            f"{release.checkpoint!r} does not exist.")
    folder = Path(rcfg.state_dir) / TARGET / "servers"
    log_path = folder / f"{release.revision[:16]}-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
    started = time.monotonic()
    log(f"starting {release.label()} beside the serving revision")
    # Two CPU servers side by side: vLLM's default pins each one's OpenMP threads to the same
    # cores with spin-waiting, and the busy old server then starves the new one's start-up
    # (measured: not ready after 300 s under client load). Unpinned + passive waiting shares
    # the cores; settings in rollout.local.server.env still win.
    server_cfg = cfg.server.model_copy(update={"env": {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE", **cfg.server.env}})
    try:
        green = start_server(release.checkpoint, server_cfg, log_path,
                             served_name=rcfg.served_model_name, die_with_parent=False)
    except ServerError as exc:
        _record_failure(settings, state, release, flow_run_id, "readiness", str(exc))
        raise RolloutFailed(release, "readiness", str(exc)) from None
    pending = Deployed(release, _now(), flow_run_id, url,
                       {"pid": green.process.pid, "url": green.base_url,
                        "log": str(log_path), "startup_s": green.startup_s})
    state.pending = pending
    save_state(rcfg.state_dir, state)

    try:
        report = verify_deployment(green.base_url, rcfg.served_model_name, rcfg.slo,
                                   rcfg.smoke_prompt, cfg.server.startup_timeout_s, green.alive)
    except DeploymentCheckFailed as exc:
        stop_server(green, cfg.server.stop_grace_s)
        state.pending = None
        _record_failure(settings, state, release, flow_run_id, exc.check, exc.reason)
        raise RolloutFailed(release, exc.check, exc.reason, exc.report) from None
    except BaseException:
        stop_server(green, cfg.server.stop_grace_s)
        state.pending = None
        save_state(rcfg.state_dir, state)
        raise

    blue = state.active
    switched = switch_router(url, green.base_url, release.revision, router_token(settings))
    shifted_s = round(time.monotonic() - started, 2)
    log(f"traffic shifted to {release.label()} after {shifted_s} s")
    pending.verification = report.as_record() | {"rollout_to_shift_s": shifted_s}
    pending.deployed_at = _now()
    state.previous, state.active, state.pending = blue, pending, None
    state.record_event("deployed", release, flow_run_id, pending.deployed_at)
    save_state(rcfg.state_dir, state)

    old_backend = switched.get("previous")
    if old_backend:
        left = drain(url, old_backend, cfg.drain_timeout_s)
        if left is None:
            log(f"the router did not answer for its in-flight count; waited the whole "
                f"{cfg.drain_timeout_s} s (rollout.local.drain_timeout_s) before stopping the "
                "old server")
        elif left:
            log(f"{left} request(s) still on the old server after {cfg.drain_timeout_s} s "
                "(rollout.local.drain_timeout_s); stopping it anyway")
    if blue is not None:
        _stop_deployed(blue, cfg.server.stop_grace_s)
        log(f"stopped the previous revision {blue.release.label()}")
    return pending, True


def _record_failure(settings: PipelineSettings, state: DeployState, release: Release,
                    flow_run_id: str | None, check: str, reason: str) -> None:
    state.record_event("rolled-back", release, flow_run_id, _now(), f"{check}: {reason[:500]}")
    save_state(settings.rollout.state_dir, state)


def shutdown_local(settings: PipelineSettings) -> None:
    """Stop everything the local target runs (servers and router); the record stays."""
    state = load_state(settings.rollout.state_dir, TARGET)
    for d in (state.pending, state.active):
        _stop_deployed(d, settings.rollout.local.server.stop_grace_s)
    stop_router(settings)
