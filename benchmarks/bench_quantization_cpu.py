"""CPU: the requantize flow vs the seed's bare oneshot script, same model, same run.

Variants, each a separate process (so peak RSS is its own), run in alternation `--repeat` times:
  bare-padded    benchmarks/seed_oneshot.py as the seed wrote it (pads to max_seq_len)
  bare-unpadded  the same script without padding
  flow           `requant run` on the demo settings with evaluation off (same work
                 as the bare script, plus what the flow adds: checks, hashing, verification,
                 manifest, artifacts), against a running Prefect server, fresh cache each time

Reports wall time and peak RSS per variant (median over repeats) and the flow's overhead
relative to bare-unpadded (same computation) and to bare-padded (what the seed did).

Usage: .venvs/pipeline/bin/python benchmarks/bench_quantization_cpu.py [--repeat 2]
       (needs the demo model: make demo-model; starts and stops its own Prefect server)
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "data" / "calibration" / "gsm8k-chat-1k.jsonl"


def run(cmd: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed:\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "stdout_tail": out.strip().splitlines()[-1] if out.strip() else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--port", type=int, default=4277)
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "cpu-quantization.json")
    args = p.parse_args()

    py = sys.executable
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", TOKENIZERS_PARALLELISM="false")
    work = Path(tempfile.mkdtemp(prefix="requant-bench-"))
    env["PREFECT_HOME"] = str(work / "prefect")
    server = subprocess.Popen([py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{args.port}/api"
    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(env["PREFECT_API_URL"] + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        variants = {
            "bare-padded": lambda i: [py, "benchmarks/seed_oneshot.py", "--model", str(MODEL),
                                      "--dataset", str(DATA), "--samples", str(args.samples),
                                      "--max-seq-len", str(args.max_seq_len),
                                      "--out", str(work / f"bare-padded-{i}")],
            "bare-unpadded": lambda i: [py, "benchmarks/seed_oneshot.py", "--no-pad",
                                        "--model", str(MODEL), "--dataset", str(DATA),
                                        "--samples", str(args.samples),
                                        "--max-seq-len", str(args.max_seq_len),
                                        "--out", str(work / f"bare-unpadded-{i}")],
            "flow": lambda i: [py, "-m", "requant", "run",
                               "--config", "deployments/configs/demo.yaml",
                               "--set", "evaluation.enabled=false",  # quantization only
                               "--set", f"calibration.num_samples={args.samples}",
                               "--set", f"calibration.max_seq_len={args.max_seq_len}",
                               "--set", f"output_dir={work / 'runs'}",
                               "--set", f"cache_dir={work / f'cache-{i}'}"],
        }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.repeat):
            for name, cmd in variants.items():
                result = run(cmd(i), env)
                runs[name].append(result)
                print(name, i, json.dumps(result), flush=True)
    finally:
        server.terminate()
        server.wait(30)

    med = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                  "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs)}
           for name, rs in runs.items()}
    def wall(name: str) -> float:
        return med[name]["wall_s"]

    report = {
        "machine": {"cpus": os.cpu_count(), "processor": _cpu()},
        "samples": args.samples, "max_seq_len": args.max_seq_len, "repeat": args.repeat,
        "median": med,
        "flow_overhead_vs_bare_unpadded": round(wall("flow") / wall("bare-unpadded") - 1, 4),
        "flow_vs_bare_padded_speedup": round(wall("bare-padded") / wall("flow"), 3),
        "unpadded_vs_padded_speedup": round(wall("bare-padded") / wall("bare-unpadded"), 3),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
