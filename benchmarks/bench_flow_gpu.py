"""GPU: the whole `requant run` (Prefect flow, every stage) against the bare quantization call.

#24 §5 asks what the pipeline costs on a GPU box beyond the quantization itself. On the same
box, same model and calibration size, in one invocation:
  flow   `python -m requant run --config <generated>` as a user runs it, in a child process:
         Prefect (its temporary local server), preflight, calibration-set prep (tokenizing the
         text), the quantization stage (load, single pass, save, the reload check), the dry-run
         publish; evaluation off (no vLLM on the box), rollout none
  bare   the stage's call in this process (bench_quantization_multigpu.run_single: load,
         ``quantize_model``, save), as the quantization benchmarks time it
  bare-process  that benchmark as a command (`bench_quantization_multigpu.py --gpus 1`), timed
         from outside as the flow is: its imports and start-up counted too, like for like
The model is the Llama-3-8B shape with random bf16 weights (bench_quantization_gpu.build_model)
and the BPE tokenizer trained on the repository's GSM8K text; the flow calibrates on text rows
(GSM8K questions, joined until each is longer than --seq-len tokens), the bare call on random
token ids of the same count: the same compute. Reported: both walls, their ratio (goal ≤ 1.05),
and the flow's stage timings from the checkpoint's manifest, so the difference is attributed.

Usage (device machine, after scripts/gpu_setup.sh with the flow's wheels):
  python benchmarks/bench_flow_gpu.py --samples 512 --out $OUT/flow.json
  python benchmarks/bench_flow_gpu.py --samples 512 --server --out $OUT/flow.json  # a server up
  python benchmarks/bench_flow_gpu.py --tiny --samples 8            # smoke, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quantization_multigpu import prepare, run_single  # noqa: E402

from requant.quantization.single_pass import BATCH_TOKENS  # noqa: E402


def text_rows(path: Path, samples: int, seq_len: int) -> Path:
    """``samples`` distinct rows of GSM8K questions, each longer than ``seq_len`` tokens of the
    benchmark's tokenizer (≥ 6 characters a token): truncated to exactly ``seq_len``."""
    questions = [json.loads(line)["question"] for line in
                 (ROOT / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(samples):
            rng.shuffle(questions)
            text, i = "", 0
            while len(text) < 6 * seq_len:
                text, i = text + " " + questions[i % len(questions)], i + 1
            f.write(json.dumps({"text": text}) + "\n")
    return path


def flow_config(work: Path, model_dir: Path, data: Path, args: argparse.Namespace) -> Path:
    config = {
        "source": {"model": str(model_dir)},
        "calibration": {"dataset": str(data), "num_samples": args.samples,
                        "max_seq_len": args.seq_len, "text_column": "text"},
        "quantization": {"preset": "w8a8-int8", "smoothing_strength": 0.8,
                         "ignore": ["lm_head"]},
        "evaluation": {"enabled": False},
        "rollout": {"target": "none"},
        "output_dir": str(work / "runs"),
        "cache_dir": str(work / "cache"),
    }
    path = work / "flow.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` before the clock, as a worker box has one running (the
    operator's, or the project's that `make prefect-up` starts and the CLI finds)."""
    import httpx

    port = 4200 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-server"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("prefect server did not start")
        time.sleep(0.5)


def run_flow(work: Path, config: Path, api_url: str | None = None) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)  # its temporary local server, as on a fresh box
    if api_url:
        env["PREFECT_API_URL"] = api_url  # --server: the box's running server
    # run from the work folder: the installed requant (with requant.flows), as a user has it;
    # from the checkout's root, its requant/ folder would shadow the installed package
    start, clock = time.perf_counter(), time.localtime()
    proc = subprocess.run([sys.executable, "-m", "requant", "run", "--config", str(config)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        raise SystemExit(f"requant run failed ({proc.returncode}):\n{tail}")
    (manifest,) = (work / "runs").glob("*/checkpoint/manifest.json")
    m = json.loads(manifest.read_text())
    return {"wall_s": round(wall, 1), "stage_timings_s": m["timings_s"],
            "peak_memory_gib": m["peak_memory_gib"],
            "timeline": timeline(proc.stdout + proc.stderr,
                                 clock.tm_hour * 3600 + clock.tm_min * 60 + clock.tm_sec),
            "output_tail": tail[-800:]}


def run_bare_process(work: Path, args: argparse.Namespace) -> dict:
    out = work / "bare.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quantization_multigpu.py"),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--gpus", "1",
           "--cache", str(args.cache), "--out", str(out), *(["--tiny"] if args.tiny else [])]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=1800)
    wall = time.perf_counter() - start
    (run,) = json.loads(out.read_text())["runs"]
    return {"wall_s": round(wall, 1), "reported_wall_s": run["wall_s"],
            "seconds": run["seconds"], "gptq_error_sum": run["gptq_error_sum"]}


LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)$")


def timeline(output: str, started: int) -> list[str]:
    """The flow's log lines, each with its seconds since the command started (whole seconds of
    the day: ±1 s): what ran when (the tasks' "Finished" lines mark where each stage ended)."""
    out = []
    for line in output.splitlines():
        if m := LOG_LINE.match(line):
            t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
            out.append(f"{t - started:7.1f}  {m[4][:160]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--small", action="store_true", help="the multi-GPU benchmark's small shape")
    p.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "multigpu")
    p.add_argument("--variants", nargs="+", choices=["flow", "bare", "bare-process"],
                   default=["flow", "bare-process"],
                   help="one per call where both would pass a time limit (--out accumulates)")
    p.add_argument("--server", action="store_true",
                   help="a Prefect server running before the clock starts, as on a worker box "
                   "(default: the flow's temporary server, as on a fresh one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = args.cache / ("tiny" if args.tiny else "8b")
    cache.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = prepare(cache, args, device)
    report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    report.update(gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                  shape="tiny" if args.tiny else "llama3-8b", samples=args.samples,
                  seq_len=args.seq_len)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        if "flow" in args.variants:  # first: a clean GPU
            rows = text_rows(work / "calibration.jsonl", args.samples, args.seq_len)
            server, url = start_server(work) if args.server else (None, None)
            try:
                report["flow"] = run_flow(work, flow_config(work, model_dir, rows, args), url)
            finally:
                if server is not None:
                    os.killpg(server.pid, 15)
                    server.wait(60)
            report["flow"]["prefect"] = "running server" if args.server else "temporary server"
            print(json.dumps({"flow": report["flow"]}), flush=True)
        if "bare-process" in args.variants:
            report["bare_process"] = run_bare_process(work, args)
            print(json.dumps({"bare_process": report["bare_process"]}), flush=True)
        if "bare" in args.variants:
            report["bare"], _ = run_single(model_dir, data_dir, args, work / "bare", BATCH_TOKENS)
    for name in ("bare", "bare_process"):
        if "flow" in report and name in report:
            report[f"flow_over_{name}"] = round(report["flow"]["wall_s"]
                                                / report[name]["wall_s"], 3)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
