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

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from requant.atomic import write_text_atomic
from requant.errors import DeploymentCheckFailed, RolloutFailed, ServerError, SettingsError
from requant.killpoints import kill_point
from requant.processes import (
    pid_running,
    read_pid,
    stop_leaderless_group,
    stop_process_group,
)
from requant.rollout.blue_green import Filled, Phases, Serving, blue_green
from requant.rollout.guardian import STOPPED, guardian_command, recorded_port
from requant.rollout.live_phases import put_phase, router_call, wait_drained
from requant.rollout.lock import target_lock
from requant.rollout.state import (
    Deployed,
    DeployState,
    Intent,
    Release,
    load_state,
    now_iso,
    save_state,
)
from requant.serving.checks import wait_until_ready
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
    """The router answering on the stable endpoint, under supervisord
    (``requant.serving.supervision``): reuse it, or start it supervised."""
    from requant.serving import supervision

    cfg = settings.rollout.local
    url = router_url(settings)
    folder = Path(settings.rollout.state_dir) / TARGET
    if cfg.supervisor == "external":
        if router_status(url) is None:
            raise SettingsError(
                f"rollout.local.supervisor is external, but no requant router answers on {url}. "
                "Start it (systemctl --user start requant-router, see "
                "deployments/systemd/requant-router.service) or set rollout.local.supervisor: "
                "supervisord.")
        return url
    supervised = supervision.supervision(folder).state in ("RUNNING", "STARTING", "BACKOFF")
    command = supervision.router_command(cfg.host, cfg.port, folder, cfg.max_request_bytes)
    # the guardian starts the serving revision's keeper again if it is killed
    others = {"guardian": guardian_command(folder)} if cfg.restart_server else {}
    if router_status(url) is not None and supervised:
        supervision.keep(folder, command, others)
        return url
    if router_status(url) is not None:  # alive but unsupervised (its supervisord died)
        log("the router runs without its supervisor: restarting it under supervisord")
        stop_router(settings)
    with socket.socket() as s:
        if s.connect_ex((cfg.host, cfg.port)) == 0:
            raise SettingsError(
                f"rollout.local.port: {cfg.host}:{cfg.port} is taken by something that is not a "
                "requant router. Stop it or choose another port."
            )
    folder.mkdir(parents=True, exist_ok=True)
    router_token(settings)  # made here, 0600, before the router reads it
    supervision.start(folder, command, others)
    deadline = time.monotonic() + 60
    while router_status(url) is None or supervision.supervision(folder).state != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router did not start on {url} "
                               f"({supervision.supervision(folder)}).\n"
                               f"{log_tail(folder / 'router.log')}")
        time.sleep(0.2)
    log(f"router started on {url} under supervisord ({supervision.supervision(folder).detail})")
    return url


def switch_router(url: str, backend: str, revision: str, token: str,
                  fallback: Deployed | None = None) -> dict[str, Any]:
    """Send new requests to ``backend``; with ``fallback``, the router sends them to that
    server instead while ``backend`` fails its health checks."""
    body: dict[str, Any] = {"url": backend, "revision": revision, "fallback": None}
    if fallback is not None:
        body["fallback"] = {"url": fallback.server["url"], "revision": fallback.release.revision}
    return router_call("PUT", url, "/-/backend", token=token, body=body,
                       what="switch the router").json()


def drain(url: str, backend: str, timeout_s: float) -> int | None:
    """``wait_drained`` on this host's router (its status needs no token on loopback)."""
    return wait_drained(lambda: router_status(url), backend, timeout_s)


def stop_router(settings: PipelineSettings) -> None:
    """supervisord and its router; and a router left without its supervisor (the pid the
    router's status reports), so the port is free again."""
    from requant.serving import supervision

    if settings.rollout.local.supervisor == "external":
        return  # its supervisor would only start it again
    folder = Path(settings.rollout.state_dir) / TARGET
    supervision.shutdown(folder)
    # the pid the router wrote beside its state, never one an HTTP answer names; signalled only
    # if that process is the router of this folder
    if (pid := read_pid(folder / "router.pid")) is not None:
        stop_process_group(pid, grace_s=10,
                           expect=("--state-file", str(folder.resolve() / "router.json")))


# ---- the rollout ------------------------------------------------------------------------------


def _stop_deployed(d: Deployed | None, grace_s: float) -> None:
    """The recorded server's process group, if that pid still runs a server on the recorded
    port (a keeper or vLLM: both command lines hold ``--port N``); and a server that outlived a
    killed keeper, in that keeper's group or adopted by the recorded one (``adopted_group``)."""
    if d is not None and d.server.get("pid"):
        expect = ("--port", recorded_port(d))
        stop_process_group(int(d.server["pid"]), grace_s, expect=expect)
        for group in (d.server["pid"], d.server.get("adopted_group")):
            if group:
                stop_leaderless_group(int(group), grace_s, expect=expect)


def _server_alive(d: Deployed | None) -> bool:
    return bool(d and d.server.get("pid") and pid_running(int(d.server["pid"])))


def answers(d: Deployed, settings: PipelineSettings) -> bool:
    """Ask the process, not the record: ready now, or within the server's start-up time while
    its keeper restarts it (a nightly no-op must not start a second copy of a server that is
    coming back by itself, nor call a dead one serving)."""
    try:
        wait_until_ready(d.server["url"], settings.rollout.served_model_name,
                         settings.rollout.local.server.startup_timeout_s,
                         alive=lambda: _server_alive(d))
    except DeploymentCheckFailed:
        return False
    return True


def recover(settings: PipelineSettings, state: DeployState, url: str, flow_run_id: str | None,
            log: Log) -> None:
    """Finish what a killed rollout left, from what the router actually serves. The state is
    written ahead of every step (pending before the switch, active right after it), so:
    - pending, and the router already sends traffic to it: the flow died between the switch
      and its record. That server serves: record it active, then drain and stop the old one;
    - pending, router elsewhere: it never served; stop it (reaped);
    - the active revision's server dead but the previous one still warm (killed while it was
      the fallback): the previous one serves again, on record too;
    - the previous revision's server still running but not routed to: the flow died before
      stopping it after a switch (maybe inside the keep-warm window: the router's fallback is
      released first); drain and stop it (rollback starts a fresh server anyway)."""
    grace = settings.rollout.local.server.stop_grace_s
    routed = router_status(url) or {}
    for kind in ("shadow", "canary"):  # only a killed rollout leaves one: rollouts hold the lock
        if routed.get(kind):
            log(f"removing the {kind} a killed rollout left ({routed[kind]['url']}): its "
                "requests go to the serving revision alone")
            put_phase(url, router_token(settings), kind, None)
            # the canary's clients are still waiting on it: they finish before it stops
            drain(url, routed[kind]["url"], settings.rollout.local.drain_timeout_s)
    backend = routed.get("backend")
    pending = state.pending
    if pending is not None and backend == pending.server.get("url") and _server_alive(pending):
        log(f"recovering: {pending.release.label()} was switched to before the rollout that "
            "started it could record it; it serves")
        state.activate(pending)
        state.record_event("deployed", pending.release, flow_run_id, now_iso(),
                           "recovered: the router served it when its rollout was killed")
        save_state(settings.rollout.state_dir, state)
    elif pending is not None:
        log(f"reaping the unfinished rollout of {pending.release.label()}")
        _stop_deployed(pending, grace)
        state.record_event("reaped", pending.release, flow_run_id, now_iso(),
                           "left pending by an earlier rollout that did not finish")
        state.pending = None
        save_state(settings.rollout.state_dir, state)
    old = state.previous
    if state.active is not None and not _server_alive(state.active) and _server_alive(old):
        assert old is not None
        log(f"recovering: {state.active.release.label()}'s server is gone and "
            f"{old.release.label()} is still warm; it serves again")
        switch_router(url, old.server["url"], old.release.revision, router_token(settings))
        state.record_event("rolled-back", state.active.release, flow_run_id, now_iso(),
                           "its server died while the previous one was still warm")
        state.active, state.previous = old, None
        save_state(settings.rollout.state_dir, state)
        return
    if old is not None and _server_alive(old) and backend != old.server.get("url"):
        if state.active is not None and (router_status(url) or {}).get("fallback"):
            # killed inside the keep-warm window: the router's fallback is about to stop
            switch_router(url, state.active.server["url"], state.active.release.revision,
                          router_token(settings))
        drain(url, old.server.get("url", ""), settings.rollout.local.drain_timeout_s)
        log(f"stopping {old.release.label()}'s server, left running by a killed rollout")
        _stop_deployed(old, grace)


def rollout_local(settings: PipelineSettings, release: Release, flow_run_id: str | None,
                  log: Log = print, intent: Intent = Intent()) -> tuple[Deployed, bool]:
    """Blue/green to ``release``; returns (what now serves, whether anything changed)."""
    check_local_settings(settings)
    with target_lock(settings.rollout.state_dir, TARGET, log):  # the guardian waits its turn
        (Path(settings.rollout.state_dir) / TARGET / STOPPED).unlink(missing_ok=True)
        state = load_state(settings.rollout.state_dir, TARGET)
        url = ensure_router(settings, log)  # a restarted router resumes its persisted backend
        recover(settings, state, url, flow_run_id, log)
        slots = LocalSlots(settings, state, url, flow_run_id, log, intent)
        return blue_green(slots, settings, release, log)


class LocalSlots:
    """The local target's two places (``requant.rollout.blue_green``): the serving revision's
    model server (blue) and a new one started beside it on a free port (green), behind the
    router on ``rollout.local.port``; the record of truth is the deployed state, written ahead
    of every step, which ``recover`` reads back after a kill."""

    verified_point = "verified"

    def __init__(self, settings: PipelineSettings, state: DeployState, url: str,
                 flow_run_id: str | None, log: Log, intent: Intent) -> None:
        cfg = settings.rollout.local
        self.settings, self.state, self.router = settings, state, url
        self.flow_run_id, self.log, self.intent = flow_run_id, log, intent
        self.token = router_token(settings)
        self.phases = Phases(cfg.shadow, cfg.canary)
        self.ready_timeout_s = cfg.server.startup_timeout_s
        self.blue, self.earlier = state.active, state.previous
        self.warm: Deployed | None = None  # the router's fallback while blue is kept warm
        self.switched: dict[str, Any] = {}

    def serving(self) -> Serving | None:
        blue = self.blue
        return None if blue is None else Serving(blue.release.revision,
                                                 lambda: _server_alive(blue))

    def already(self, release: Release, serving: Serving | None) -> Deployed | None:
        """Only if the record, the router and the server itself all say so."""
        active, current = self.state.active, router_status(self.router) or {}
        if (active and active.release.revision == release.revision
                and current.get("backend") == active.server.get("url")
                and answers(active, self.settings)):
            self.log(f"{release.label()} is already serving at {self.router}; nothing to do")
            return active
        return None

    def fill(self, release: Release, serving: Serving | None) -> Filled:
        if not release.checkpoint or not Path(release.checkpoint).is_dir():
            raise SettingsError(f"release {release.label()}: checkpoint folder "
                                f"{release.checkpoint!r} does not exist.")
        green = _start_green(self, release)
        return Filled(green.base_url, green.unbroken, green, process_alive=green.unbroken)

    def wait(self, new: Filled) -> None:
        """Nothing: the server's start waited for its readiness."""

    def discard(self, new: Filled, release: Release, failure: tuple[str, str] | None) -> None:
        """Stop a green that failed its checks. A canary's clients may still be waiting on it
        (its share already goes back to the serving revision): their requests finish first. A
        router that does not answer is not waited on: nothing can be routed through it."""
        green = new.handle
        if (router_status(self.router) or {}).get("inflight", {}).get(green.base_url):
            drain(self.router, green.base_url, self.settings.rollout.local.drain_timeout_s)
        stop_server(green, self.settings.rollout.local.server.stop_grace_s)
        self.state.pending = None
        if failure is not None:
            _record_failure(self.settings, self.state, release, self.flow_run_id, *failure)
        else:
            save_state(self.settings.rollout.state_dir, self.state)

    def verified(self, new: Filled) -> None:
        """Nothing more: the deployed state records green only once it serves."""

    def switch(self, new: Filled, release: Release) -> None:
        """The router to green, blue kept as its fallback while warm."""
        blue, cfg = self.blue, self.settings.rollout.local
        self.warm = blue if blue is not None and cfg.keep_previous_s > 0 \
            and _server_alive(blue) else None
        self.switched = switch_router(self.router, new.url, release.revision, self.token,
                                      fallback=self.warm)
        kill_point("switched")

    def record(self, new: Filled, release: Release, verification: dict[str, Any]) -> Deployed:
        pending = self.state.pending
        assert pending is not None
        pending.verification = verification
        pending.deployed_at = now_iso()
        self.state.activate(pending)
        self.state.record_event("deployed", release, self.flow_run_id, pending.deployed_at)
        save_state(self.settings.rollout.state_dir, self.state)
        kill_point("recorded")
        return pending

    def settle(self, new: Filled, release: Release, deployed: Deployed) -> None:
        """Blue kept warm as the router's fallback for ``rollout.local.keep_previous_s``; if
        green fails the router's health checks meanwhile, blue serves again (``_undo``)."""
        if self.warm is not None:
            cfg = self.settings.rollout.local
            self.log(f"keeping {self.warm.release.label()} warm as the fallback for "
                     f"{cfg.keep_previous_s} s (rollout.local.keep_previous_s)")
            if not stays_healthy(self.router, new.url, cfg.keep_previous_s):
                _undo(self, self.warm, new.handle, release)
            switch_router(self.router, new.url, release.revision, self.token)
        kill_point("unwarmed")

    def retire(self) -> None:
        _retire(self.settings, self.router, self.switched.get("previous"), self.blue, self.log)


def _start_green(r: LocalSlots, release: Release) -> Any:
    """The new revision's server beside the serving one, recorded as ``pending`` from the
    moment it exists: a rollout killed from then on is reaped by the next one."""
    rcfg, cfg = r.settings.rollout, r.settings.rollout.local
    folder = Path(rcfg.state_dir) / TARGET / "servers"
    log_path = folder / f"{release.revision[:16]}-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
    r.log(f"starting {release.label()} beside the serving revision")
    # Two CPU servers side by side: vLLM's default pins each one's OpenMP threads to the same
    # cores with spin-waiting, and the busy old server then starves the new one's start-up
    # (measured: not ready after 300 s under client load). Unpinned + passive waiting shares
    # the cores; settings in rollout.local.server.env still win.
    server_cfg = cfg.server.model_copy(update={"env": {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE", **cfg.server.env}})

    def record_spawned(handle: Any) -> None:  # before the wait: a kill from here on is reaped
        r.state.pending = Deployed(release, now_iso(), r.flow_run_id, r.router,
                                   {"pid": handle.process.pid, "url": handle.base_url,
                                    "log": str(log_path),
                                    "keeper": str(handle.keeper_status)
                                    if handle.keeper_status else None,
                                    # what the guardian starts again if the keeper is killed
                                    "launch": {"command": handle.launched, "env": handle.env}
                                    if handle.keeper_status else None},
                                   rollback=r.intent.rollback, forced=r.intent.forced)
        save_state(rcfg.state_dir, r.state)
        kill_point("spawned")

    try:
        green = start_server(release.checkpoint, server_cfg, log_path,
                             on_spawn=record_spawned, served_name=rcfg.served_model_name,
                             die_with_parent=False, keep_running=cfg.restart_server)
    except ServerError as exc:
        r.state.pending = None
        _record_failure(r.settings, r.state, release, r.flow_run_id, "readiness", str(exc))
        raise RolloutFailed(release, "readiness", str(exc)) from None
    assert r.state.pending is not None
    r.state.pending.server["startup_s"] = green.startup_s
    save_state(rcfg.state_dir, r.state)
    kill_point("ready")
    return green


def stays_healthy(url: str, backend: str, seconds: float) -> bool:
    """True unless the router's health checks see ``backend`` down within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = (router_status(url) or {}).get("health", {}).get(backend, {})
        if health.get("healthy") is False:
            return False
        time.sleep(0.5)
    return True


def _undo(r: LocalSlots, warm: Deployed, green: Any, release: Release) -> None:
    """The new revision died while the previous one was still warm: the previous one serves
    again (the router already sent it the traffic), on record too, and the rollout fails."""
    switch_router(r.router, warm.server["url"], warm.release.revision, r.token)
    r.state.active, r.state.previous = warm, r.earlier
    stop_server(green, r.settings.rollout.local.server.stop_grace_s)
    reason = (f"{green.base_url} failed the router's health checks within "
              f"rollout.local.keep_previous_s; {warm.release.label()} serves again")
    _record_failure(r.settings, r.state, release, r.flow_run_id, "served", reason)
    raise RolloutFailed(release, "served", reason)


def _retire(settings: PipelineSettings, url: str, old_backend: str | None,
            blue: Deployed | None, log: Log) -> None:
    """Drain the previous revision's requests, then stop its server."""
    cfg = settings.rollout.local
    if old_backend:
        left = drain(url, old_backend, cfg.drain_timeout_s)
        if left is None:
            log(f"the router did not answer for its in-flight count; waited the whole "
                f"{cfg.drain_timeout_s} s (rollout.local.drain_timeout_s) before stopping the "
                "old server")
        elif left:
            log(f"{left} request(s) still on the old server after {cfg.drain_timeout_s} s "
                "(rollout.local.drain_timeout_s); stopping it anyway")
    kill_point("drained")
    if blue is not None:
        _stop_deployed(blue, cfg.server.stop_grace_s)
        log(f"stopped the previous revision {blue.release.label()}")


def _record_failure(settings: PipelineSettings, state: DeployState, release: Release,
                    flow_run_id: str | None, check: str, reason: str) -> None:
    state.record_event("rolled-back", release, flow_run_id, now_iso(), f"{check}: {reason[:500]}")
    save_state(settings.rollout.state_dir, state)


def shutdown_local(settings: PipelineSettings) -> None:
    """Stop everything the local target runs (router, guardian, servers); the record stays,
    and the guardian (also one under systemd) leaves it alone until the next rollout."""
    folder = Path(settings.rollout.state_dir) / TARGET
    if not folder.is_dir():
        return
    with target_lock(settings.rollout.state_dir, TARGET):
        write_text_atomic(folder / STOPPED, f"{now_iso()}\n")
        stop_router(settings)  # supervisord's guardian first, so nothing starts a server again
        state = load_state(settings.rollout.state_dir, TARGET)
        for d in (state.pending, state.active):
            _stop_deployed(d, settings.rollout.local.server.stop_grace_s)
