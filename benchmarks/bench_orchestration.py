"""Orchestration overhead: the whole flow as a Prefect deployment run by a worker, versus the same
stages called as plain Python; and the wall time of a no-op nightly.

Same model (the demo SmolLM2-135M), same settings (demo config, lm-eval on a 16-question slice,
fresh caches so both variants really evaluate the baseline), one after the other on this
machine:
  plain       a process that calls the stages' Prefect-free functions in the flow's order:
              resolve source -> calibration set -> quantize + verify -> evaluate baseline and
              candidate (vLLM servers + lm-eval) -> gate -> publish (dry run)
  deployment  run_deployment("requantize/requantize") on a real Prefect server, picked up by a
              process worker on the requant-gpu pool: pull step, flow run process, task runs,
              artifacts, events, the GPU concurrency slot, the candidate ledger
  no-op       the deployment again with the same settings (force=false): the candidate ledger
              says it was already published, so the run ends after preparing the calibration set

Usage: .venvs/pipeline/bin/python benchmarks/bench_orchestration.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "deployments" / "configs" / "demo.yaml"


def settings_dict(work: Path, label: str) -> dict:
    from requant.settings import load_settings

    s = load_settings(CONFIG, ["evaluation.limit=16", "rollout.target=none",
                               f"output_dir={work / label / 'runs'}",
                               f"cache_dir={work / label / 'cache'}"])
    return s.model_dump(mode="json")


def plain(settings_json: str) -> None:
    """The stages without Prefect (each module's plain functions)."""
    from requant.calibration import build_calibration_set
    from requant.evaluation.gate import decide
    from requant.evaluation.lmeval import evaluate_model
    from requant.hub.publish import publish_checkpoint
    from requant.quantization.checkpoint import quantize_checkpoint
    from requant.quantization.hardware import detect_accelerator
    from requant.quantization.recipes import resolve_recipe
    from requant.settings import validate_settings
    from requant.source import resolve_source_files

    s = validate_settings(json.loads(settings_json))
    run = Path(s.output_dir) / "plain"
    recipe = resolve_recipe(s.quantization)
    acc = detect_accelerator(s.quantization.device)
    source = resolve_source_files(s.source, with_weights=False)
    calib = build_calibration_set(s.calibration, source, s.cache_dir)
    ckpt = quantize_checkpoint(s, source, calib, recipe, acc, run / "checkpoint", {})
    base = evaluate_model("baseline", ckpt.source.path, s.evaluation, run / "eval" / "baseline",
                          on_gpu=False)
    cand = evaluate_model("candidate", ckpt.path, s.evaluation, run / "eval" / "candidate",
                          on_gpu=False)
    decision = decide(base.scores(), cand.scores(), s.gate, task=cand.task, metric=cand.metric)
    publish_checkpoint(s.hub, ckpt.path, run / "eval", None, ckpt.manifest,
                       decision.as_record(), run / "publish", None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plain", help=argparse.SUPPRESS)
    p.add_argument("--worker-poll-s", type=int, default=10,
                   help="PREFECT_WORKER_QUERY_SECONDS of the worker (Prefect's default: 10)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.out = args.out or (ROOT / "docs" / "measurements"
                            / f"cpu-orchestration-poll{args.worker_poll_s}.json")
    if args.plain:
        plain(args.plain)
        return

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from requant.serving.server import free_port

    work = Path(tempfile.mkdtemp(prefix="requant-orch-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "REQUANT_PROJECT_DIR": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    prefect = str(Path(sys.executable).parent / "prefect")
    procs = [subprocess.Popen([prefect, "server", "start"], env=env, cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    result: dict = {"machine": "2 cores (AVX-512), no GPU", "settings":
                    "deployments/configs/demo.yaml, evaluation.limit=16, fresh caches"}
    try:
        import httpx

        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        subprocess.run(["bash", "scripts/prefect_apply.sh"], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        procs.append(subprocess.Popen(
            [prefect, "worker", "start", "--pool", "requant-gpu", "--type", "process"],
            env=env | {"PREFECT_WORKER_QUERY_SECONDS": str(args.worker_poll_s)}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))

        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--plain",
                        json.dumps(settings_dict(work, "plain"))], cwd=ROOT, check=True,
                       env={k: v for k, v in env.items() if not k.startswith("PREFECT_API")})
        result["plain_s"] = round(time.perf_counter() - t, 1)
        print("plain", result["plain_s"], flush=True)

        from prefect.deployments import run_deployment

        # the worker's profile for this benchmark, where a worker finds profiles (docs/trust.md);
        # the run itself sends only its request
        profile = ROOT / "deployments" / "configs" / "bench-orchestration.yaml"
        profile.write_text(json.dumps(settings_dict(work, "deployment")))
        request = {"profile": profile.stem}
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            for label in ("deployment", "no_op_nightly"):
                t = time.perf_counter()
                run = run_deployment("requantize/requantize", parameters={"request": request},
                                     timeout=None)
                wall = time.perf_counter() - t
                assert run.state.is_completed(), run.state
                result[f"{label}_s"] = round(wall, 1)
                result[f"{label}_flow_run_s"] = round(run.total_run_time.total_seconds(), 1)
                print(label, result[f"{label}_s"], flush=True)
        summary = json.loads((work / "deployment" / "runs" / str(run.id) / "summary.json")
                             .read_text())
        assert summary.get("no_op") is True, summary
        result["ratio_deployment_vs_plain"] = round(result["deployment_s"] / result["plain_s"],
                                                    3)
        result["worker_poll_interval_s"] = args.worker_poll_s
    finally:
        (ROOT / "deployments" / "configs" / "bench-orchestration.yaml").unlink(missing_ok=True)
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
