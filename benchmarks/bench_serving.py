"""Serving on this machine: W8A8 vs BF16 under the seed's concurrency test, and server start-up.

Runs, one server at a time (same host, same settings apart from the checkpoint):
  w8a8 cold   compiled server (torch.compile) with an empty compile cache: start-up time, load test
  w8a8 warm   the same again with the cache the cold start filled: start-up time
  w8a8 eager  --enforce-eager (what evaluation uses on CPU): start-up time
  bf16 cold   the unquantized source, compiled: start-up time, load test
Load test: 64 concurrent chat completions of exactly 64 tokens (requant.serving.loadtest).

Usage: .venvs/pipeline/bin/python benchmarks/bench_serving.py --w8a8 runs/<id>/checkpoint \
           [--bf16 models/SmolLM2-135M-Instruct] [--out docs/measurements/cpu-serving.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.serving.loadtest import run_load  # noqa: E402
from requant.serving.server import running_server  # noqa: E402
from requant.settings import ServerSettings  # noqa: E402


def measure(label: str, model: Path, cache_root: Path, *, eager: bool, load: bool,
            args) -> dict:
    cfg = ServerSettings(max_model_len=2048, max_num_seqs=64, enforce_eager=eager,
                         startup_timeout_s=900,
                         env={"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CACHE_ROOT": str(cache_root)})
    log = Path(args.logs) / f"{label}.log"
    with running_server(model, cfg, log, served_name=label) as server:
        row = {"label": label, "model": str(model), "eager": eager, "startup_s": server.startup_s}
        if load:
            run_load(server.base_url, label, requests=8, concurrency=8, max_tokens=16)  # warm-up
            row["load"] = run_load(server.base_url, label, requests=args.requests,
                                   concurrency=args.concurrency,
                                   max_tokens=args.max_tokens).as_record()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--w8a8", type=Path, required=True)
    p.add_argument("--bf16", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--logs", default=tempfile.mkdtemp(prefix="requant-serving-"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "cpu-serving.json")
    args = p.parse_args()

    w8a8_cache = Path(tempfile.mkdtemp(prefix="vllm-cache-w8a8-"))
    bf16_cache = Path(tempfile.mkdtemp(prefix="vllm-cache-bf16-"))
    rows = [
        measure("w8a8-cold", args.w8a8, w8a8_cache, eager=False, load=True, args=args),
        measure("w8a8-warm", args.w8a8, w8a8_cache, eager=False, load=False, args=args),
        measure("w8a8-eager", args.w8a8, w8a8_cache, eager=True, load=True, args=args),
        measure("bf16-cold", args.bf16, bf16_cache, eager=False, load=True, args=args),
    ]
    by = {r["label"]: r for r in rows}
    report = {
        "machine": {"cpus": __import__("os").cpu_count(), "processor": platform.processor()},
        "rows": rows,
        "w8a8_vs_bf16_throughput": round(by["w8a8-cold"]["load"]["tokens_per_s"]
                                         / by["bf16-cold"]["load"]["tokens_per_s"], 3),
        "logs": args.logs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
