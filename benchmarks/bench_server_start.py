"""vLLM's start-up and speed on a CPU host, with its worker in a process of its own (vLLM's
default on CPU) or inside the engine process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Every evaluation stage, every rollout and every test starts a server; on 2 cores each start costs
about a minute, a third of it importing vLLM and torch once more in the worker process. Per mode
and repeat: the time to ready (``start_server``: /health and /v1/models), then the demo's cloze
questions through lm-eval on that server, their per-question scores compared across modes (the
worker's placement must not change an answer).

Usage: .venvs/pipeline/bin/python benchmarks/bench_server_start.py [--questions 24] [--repeat 2]
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

from requant.evaluation.lmeval import per_doc_scores, run_lm_eval_on_server  # noqa: E402
from requant.evaluation.task_files import render_task_dir, task_dir  # noqa: E402
from requant.serving.server import running_server  # noqa: E402
from requant.settings import EvaluationSettings, PipelineSettings  # noqa: E402

TASK = "gsm8k_cloze_local"
MODES = {"separate-worker": "1", "worker-in-engine": "0"}


def one(mode: str, model: Path, cfg: EvaluationSettings, tasks: Path, questions: list[int],
        work: Path) -> dict:
    server_cfg = cfg.server.model_copy(update={"env": {
        **cfg.server.env, "VLLM_ENABLE_V1_MULTIPROCESSING": MODES[mode]}})
    with running_server(model, server_cfg, work / f"{mode}-{time.time_ns()}.log",
                        served_name="bench") as server:
        started = time.perf_counter()
        results = run_lm_eval_on_server(model, server.base_url, "bench", cfg, tasks, TASK,
                                        questions)
        eval_s = time.perf_counter() - started
    scores = per_doc_scores(TASK, results["samples"][TASK])
    return {"mode": mode, "startup_s": server.startup_s, "eval_s": round(eval_s, 1),
            "scores": {k: dict(sorted(v.items())) for k, v in scores.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "deployments" / "configs" / "demo.yaml")
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "cpu-server-start.json")
    args = p.parse_args()

    import yaml

    settings = PipelineSettings.model_validate(yaml.safe_load(args.config.read_text()))
    cfg = settings.evaluation
    model = Path(settings.source.model)
    model = model if model.is_absolute() else ROOT / model
    work = Path(tempfile.mkdtemp(prefix="requant-serverstart-"))
    tasks = render_task_dir(task_dir(cfg), work / "tasks")
    runs = [one(mode, model, cfg, tasks, list(range(args.questions)), work)
            for _ in range(args.repeat) for mode in MODES]
    for r in runs:
        print(f"{r['mode']:>17}: ready after {r['startup_s']:5.1f} s, "
              f"{args.questions} cloze questions in {r['eval_s']:5.1f} s")
    same = all(r["scores"] == runs[0]["scores"] for r in runs)
    print(f"per-question scores identical across modes and repeats: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": str(args.config), "questions": args.questions,
                                    "runs": [{k: v for k, v in r.items() if k != "scores"}
                                             for r in runs],
                                    "scores_identical": same}, indent=2) + "\n")


if __name__ == "__main__":
    main()
