"""Evaluation speed: the same gsm8k slice through a vLLM server vs lm-eval's HF backend.

Same model (the BF16 source, which both backends run natively), same task, few-shot count and
limit, one run. The server path is what the pipeline uses (tasks.evaluation.evaluate_model,
start-up included); the HF path is lm-eval's `hf` model in this process.

Usage: .venvs/pipeline/bin/python benchmarks/bench_eval_speed.py [--limit 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.evaluation.staged import EvalJob, evaluate_staged  # noqa: E402
from requant.evaluation.task_files import render_task_dir, task_dir  # noqa: E402
from requant.settings import (  # noqa: E402
    EvaluationSettings,
    GateRule,
    GateSettings,
    ServerSettings,
)

TASK, METRIC = "gsm8k_local", "exact_match,strict-match"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--fewshot", type=int, default=5)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "cpu-eval-speed.json")
    args = p.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = EvaluationSettings(tasks=[TASK], task_limits={}, limit=args.limit,
                             num_fewshot=args.fewshot, server=ServerSettings(max_model_len=2048))
    gate = GateSettings(rules=[GateRule(task=TASK, metric=METRIC, min_baseline=0.0)],
                        looks=[1.0])
    work = Path(tempfile.mkdtemp(prefix="requant-evalspeed-"))
    started = time.perf_counter()
    served = evaluate_staged(EvalJob(cfg, gate, on_gpu=False), "baseline", args.model,
                             work / "server")
    server_s = time.perf_counter() - started

    tasks = render_task_dir(task_dir(cfg), work / "tasks")
    started = time.perf_counter()
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(args.model), "add_bos_token": True, "dtype": "bfloat16",
                    "device": "cpu"},
        tasks=[TASK], num_fewshot=args.fewshot, limit=args.limit,
        batch_size=args.hf_batch_size, gen_kwargs="max_gen_toks=256",
        task_manager=TaskManager(include_path=str(tasks)),
    )
    hf_s = time.perf_counter() - started
    report = {
        "task": TASK, "limit": args.limit, "num_fewshot": args.fewshot,
        "vllm_server": {"wall_s": round(server_s, 1), "startup_s": served.timings_s.get(
            "server_startup"), "score": served.score(TASK, METRIC)},
        "hf_backend": {"wall_s": round(hf_s, 1), "batch_size": args.hf_batch_size,
                       "score": hf["results"][TASK][METRIC]},
        "hf_over_server": round(hf_s / server_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
