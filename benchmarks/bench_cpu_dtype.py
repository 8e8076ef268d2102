"""bf16 vs fp32, and the engine's cores, on this CPU: why CPU serving and calibration compute in
fp32 where the CPU has no native bf16 (requant.quantization.hardware.cpu_has_native_bf16), and
why CPU servers reserve no core for the HTTP frontend (VLLM_CPU_NUM_OF_RESERVED_CPU=0).

Measurements, same process, same machine:
1. a Linear of the demo model's MLP shape (4096 tokens x 576 -> 1536), GFLOP/s per dtype;
2. with --serving: a vLLM server (serving environment) on the demo model per dtype, 8 concurrent
   completions of a ~550-token prompt and exactly 64 generated tokens; wall time per dtype;
   then fp32 with vLLM's default (one core kept for the frontend) and with none kept, on
   lm-eval's loglikelihood shape (96 prompts of ~135 tokens, echo + logprobs, 8 at a time).

Usage: .venvs/pipeline/bin/python benchmarks/bench_cpu_dtype.py [--serving] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as "
          "many clips in May. How many clips did Natalia sell altogether? Answer: 72. ") * 12


def linear_gflops(dtype_name: str, repeat: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    x, w = torch.randn(4096, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    torch.nn.functional.linear(x, w)
    started = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(x, w)
    return round(2 * 4096 * 576 * 1536 * repeat / (time.perf_counter() - started) / 1e9, 1)


def serving_wall_s(dtype_name: str, model: Path, port: int, *, loglikelihood: bool = False,
                   env: dict[str, str] | None = None) -> dict[str, float]:
    import httpx

    from requant.serving.server import serving_python
    from requant.settings import ServerSettings

    cmd = [str(serving_python(ServerSettings())), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--served-model-name", "m", "--port", str(port),
           "--max-model-len", "2048", "--enforce-eager", "--dtype", dtype_name]
    log = open(f"/tmp/bench-cpu-dtype-{dtype_name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"vLLM ({dtype_name}) did not start; see {log.name}")
            time.sleep(1)

        def one(i: int) -> dict:
            body = ({"prompt": f"{i} {i * 7} {PROMPT[:480]} {i}", "max_tokens": 1,
                     "echo": True, "logprobs": 1} if loglikelihood else
                    {"prompt": f"{i} {PROMPT}", "max_tokens": 64, "ignore_eos": True})
            return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=900, json={
                "model": "m", "temperature": 0, **body}).json()["usage"]

        started = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            usage = list(pool.map(one, range(96 if loglikelihood else 8)))
        return {"wall_s": round(time.perf_counter() - started, 1),
                "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
                "completion_tokens": sum(u["completion_tokens"] for u in usage)}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serving", action="store_true", help="also time vLLM per dtype")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import torch

    from requant.quantization.hardware import cpu_has_native_bf16

    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
              "linear_gflops": {d: linear_gflops(d) for d in ("float32", "bfloat16")}}
    if args.serving:
        result["vllm"] = {d: serving_wall_s(d, args.model, 8111 + i)
                          for i, d in enumerate(("float32", "bfloat16"))}
        result["vllm_loglikelihood_fp32"] = {
            f"reserved_cpus={n or 'default'}": serving_wall_s(
                "float32", args.model, 8115 + i, loglikelihood=True,
                env={"VLLM_CPU_NUM_OF_RESERVED_CPU": n} if n else None)
            for i, n in enumerate(("", "0"))}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
