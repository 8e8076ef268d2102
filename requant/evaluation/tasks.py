"""Evaluation: lm-eval against the model as vLLM serves it.

We evaluate what we will ship: the checkpoint runs in a real vLLM server (serving environment,
a process) and lm-eval's ``local-completions`` model sends it tokenized requests over HTTP, so
``add_bos_token`` takes effect exactly as configured. The baseline (the unquantized source) goes
through the same path, and its result is cached under a key of everything that determines it,
so a nightly run does not re-evaluate an unchanged baseline.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from requant.atomic import atomic_directory, write_json_atomic
from requant.errors import ServerError, SettingsError
from requant.evaluation.gate import Scores
from requant.evaluation.progress import RequestCounter, counting_completions_model
from requant.hashing import fingerprint, hash_files, sha256_file
from requant.progress import Report, no_progress, polling
from requant.serving.server import log_tail, running_server, serving_python
from requant.settings import EvaluationSettings


@dataclass(frozen=True)
class ModelEvaluation:
    label: str  # "baseline" | "candidate"
    model: str
    task: str  # the gating task
    metric: str  # "metric,filter"
    score: float
    per_doc: dict[int, float]
    all_scores: dict[str, dict[str, float]]  # task -> {"metric,filter": value}
    result_dir: Path
    cached: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)

    def scores(self) -> Scores:
        return Scores(self.score, self.per_doc)

    def as_record(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "task": self.task,
                "metric": self.metric, "score": self.score, "documents": len(self.per_doc),
                "all_scores": self.all_scores, "result_dir": str(self.result_dir),
                "cached": self.cached, "timings_s": self.timings_s}


# ---------------------------------------------------------------------------------------------
# Plain functions
# ---------------------------------------------------------------------------------------------


def gate_task(cfg: EvaluationSettings) -> str:
    return cfg.gate_task or cfg.tasks[0]


def task_dir(cfg: EvaluationSettings) -> Path | None:
    if cfg.task_dir is None:
        return None
    path = Path(cfg.task_dir)
    return path if path.is_absolute() else (Path.cwd() / path)


def resolved_data_files(path: Path, doc: dict[str, Any]) -> dict[str, str] | str | None:
    """A task YAML's ``data_files`` made absolute: they are written relative to the YAML itself,
    so the project can move."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        return {split: str((path.parent / f).resolve()) for split, f in files.items()}
    if isinstance(files, str):
        return str((path.parent / files).resolve())
    return None


def render_task_dir(src: Path, dst: Path) -> Path:
    """Copy task YAMLs with absolute ``data_files``, so lm-eval reads them from any cwd."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if (files := resolved_data_files(path, doc)) is not None:
            doc["dataset_kwargs"]["data_files"] = files
        (dst / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def task_data_hashes(src: Path | None) -> dict[str, str]:
    """Hashes of the task YAMLs and the local data they read: part of the baseline cache key."""
    if src is None or not src.is_dir():
        return {}
    hashes = hash_files(src, [p.name for p in sorted(src.glob("*.yaml"))])
    for path in sorted(src.glob("*.yaml")):
        files = resolved_data_files(path, yaml.safe_load(path.read_text()))
        for f in (files.values() if isinstance(files, dict) else [files] if files else []):
            if Path(f).is_file():
                hashes[f"data:{Path(f).name}"] = sha256_file(Path(f))
    return hashes


def validate_tasks(cfg: EvaluationSettings) -> None:
    """Unknown task names fail now, with the closest real names, before any server starts."""
    from lm_eval.tasks import TaskManager

    src = task_dir(cfg)
    if src is not None and not src.is_dir():
        raise SettingsError(
            f"evaluation.task_dir: {src} is not a directory. Point it at lm-eval task YAMLs "
            "or set it to null."
        )
    known = set(TaskManager(include_path=str(src) if src else None).all_tasks)
    for name in cfg.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SettingsError(f"evaluation.tasks: lm-eval has no task {name!r}.{hint}")
    if gate_task(cfg) not in cfg.tasks:
        raise SettingsError(
            f"evaluation.gate_task: {cfg.gate_task!r} is not one of evaluation.tasks "
            f"{cfg.tasks}. Add it there or pick one of them."
        )
    if cfg.backend == "vllm":
        check = subprocess.run(
            [str(serving_python(cfg.server)), "-c", "import lm_eval, vllm"],
            capture_output=True, text=True, check=False,
        )
        if check.returncode != 0:
            raise SettingsError(
                "evaluation.backend: 'vllm' runs lm-eval inside the serving environment, which "
                f"lacks lm_eval or vllm ({check.stderr.strip().splitlines()[-1:]}). Use "
                "backend=server, or install lm-eval there."
            )


def extract_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, metrics in (results.get("results") or {}).items():
        out[name] = {k: float(v) for k, v in metrics.items()
                     if "," in k and not k.split(",")[0].endswith("_stderr")
                     and isinstance(v, int | float)}
    return out


def per_doc_scores(samples: list[dict[str, Any]], metric_filter: str) -> dict[int, float]:
    """doc_id -> score for the gating metric under the gating filter, from lm-eval's samples."""
    metric, filt = metric_filter.split(",")
    scores: dict[int, float] = {}
    for s in samples:
        if s.get("filter", filt) != filt or metric not in s:
            continue
        scores[int(s["doc_id"])] = float(s[metric])
    return scores


def baseline_cache_key(source_record: dict[str, Any], cfg: EvaluationSettings) -> str:
    return fingerprint({
        "source": {k: source_record.get(k) for k in ("model", "revision", "files")},
        "tasks": cfg.tasks, "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
        "max_gen_toks": cfg.max_gen_toks, "add_bos_token": cfg.add_bos_token,
        "backend": cfg.backend, "max_model_len": cfg.server.max_model_len,
        "task_files": task_data_hashes(task_dir(cfg)),
        "lm_eval": metadata.version("lm_eval"),
    })


# ---------------------------------------------------------------------------------------------
# Running lm-eval
# ---------------------------------------------------------------------------------------------


def run_lm_eval_on_server(
    tokenizer_dir: Path, base_url: str, served_name: str, cfg: EvaluationSettings,
    include_path: Path | None, label: str = "model", report: Report = no_progress,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    counter = RequestCounter(base_url, label, report)
    model = counting_completions_model(
        counter,
        model=served_name,
        base_url=f"{base_url}/v1/completions",
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,  # needed for add_bos_token to reach the server
        add_bos_token=cfg.add_bos_token,
        num_concurrent=cfg.num_concurrent,
        max_retries=3,
        max_gen_toks=cfg.max_gen_toks,
        max_length=cfg.server.max_model_len,
        timeout=600,
    )
    with polling(counter.poll):
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            log_samples=True,
            task_manager=TaskManager(include_path=str(include_path) if include_path else None),
        )
    counter.poll()
    return results


def run_lm_eval_in_vllm(
    model: Path, cfg: EvaluationSettings, include_path: Path | None, out: Path, log: Path,
) -> dict[str, Any]:
    """The seed's command (lm_eval --model vllm ...) in the serving environment's process."""
    args = {"pretrained": str(model), "add_bos_token": cfg.add_bos_token,
            "max_model_len": cfg.server.max_model_len, "max_gen_toks": cfg.max_gen_toks,
            "enforce_eager": cfg.server.enforce_eager is not False}
    cmd = [str(serving_python(cfg.server)), "-m", "lm_eval", "--model", "vllm",
           "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
           "--tasks", ",".join(cfg.tasks), "--num_fewshot", str(cfg.num_fewshot),
           "--batch_size", "auto", "--log_samples", "--output_path", str(out)]
    if cfg.limit:
        cmd += ["--limit", str(cfg.limit)]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    with log.open("ab") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, **cfg.server.env})
    if proc.returncode != 0:
        raise ServerError(f"lm-eval (vllm backend) failed with code {proc.returncode}.\n"
                          f"{log_tail(log)}")
    (results_file,) = sorted(out.rglob("results_*.json"))[-1:]
    results = json.loads(results_file.read_text())
    results["samples"] = {
        name: [json.loads(line) for f in sorted(out.rglob(f"samples_{name}_*.jsonl"))
               for line in f.read_text().splitlines() if line.strip()]
        for name in cfg.tasks
    }
    return results


def evaluate_model(
    label: str, model_dir: Path, cfg: EvaluationSettings, out_dir: Path, *, on_gpu: bool,
    report: Report = no_progress,
) -> ModelEvaluation:
    """Serve ``model_dir``, run lm-eval against it, and write ``out_dir`` atomically."""
    include = task_dir(cfg)
    started = time.monotonic()
    timings: dict[str, float] = {}
    with atomic_directory(out_dir) as tmp:
        rendered = render_task_dir(include, tmp / "tasks") if include else None
        if cfg.backend == "server":
            with running_server(model_dir, cfg.server, tmp / "server.log",
                                served_name=f"requant-{label}", on_gpu=on_gpu) as server:
                timings["server_startup"] = server.startup_s
                try:
                    results = run_lm_eval_on_server(model_dir, server.base_url,
                                                    server.served_model_name, cfg, rendered,
                                                    label, report)
                except Exception:
                    server.check_alive()  # a dead server is the cause: say so, with its log
                    raise
                # lm-eval may turn failed requests into empty answers after its retries; a
                # server that died meanwhile would otherwise look like a model scoring zero.
                server.check_alive()
        else:
            results = run_lm_eval_in_vllm(model_dir, cfg, rendered, tmp / "lm_eval_output",
                                          tmp / "lm_eval.log")
        timings["total"] = round(time.monotonic() - started, 1)
        result = summarize(label, str(model_dir), results, cfg, out_dir, timings)
        samples = results.pop("samples", {})
        for name, rows in samples.items():
            with (tmp / f"samples_{name}.jsonl").open("w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=str) + "\n")
        write_json_atomic(tmp / "results.json", results)
        write_json_atomic(tmp / "summary.json", result.as_record())
        # Saved with the samples so a cached copy can be re-read without lm-eval.
        write_json_atomic(tmp / "per_doc.json", {str(k): v for k, v in result.per_doc.items()})
    return result


def summarize(label: str, model: str, results: dict[str, Any], cfg: EvaluationSettings,
              out_dir: Path, timings: dict[str, float]) -> ModelEvaluation:
    name = gate_task(cfg)
    scores = extract_scores(results)
    if cfg.gate_metric not in scores.get(name, {}):
        raise SettingsError(
            f"evaluation.gate_metric: task {name} reported {sorted(scores.get(name, {}))}, not "
            f"{cfg.gate_metric!r}. Pick one of those."
        )
    per_doc = per_doc_scores((results.get("samples") or {}).get(name, []), cfg.gate_metric)
    return ModelEvaluation(label, model, name, cfg.gate_metric, scores[name][cfg.gate_metric],
                      per_doc, scores, out_dir, False, timings)


def load_result(label: str, result_dir: Path, *, cached: bool) -> ModelEvaluation:
    summary = json.loads((result_dir / "summary.json").read_text())
    per_doc = {int(k): v for k, v in json.loads((result_dir / "per_doc.json").read_text()).items()}
    return ModelEvaluation(label, summary["model"], summary["task"], summary["metric"],
                      summary["score"], per_doc, summary["all_scores"], result_dir, cached,
                      summary.get("timings_s", {}))


def evaluate_baseline_cached(
    cfg: EvaluationSettings, source_record: dict[str, Any], model_dir: Path, cache_dir: Path,
    out_dir: Path, on_gpu: bool, report: Report = no_progress,
) -> ModelEvaluation:
    """The unquantized source, from the cache when nothing that determines it has changed."""
    key = baseline_cache_key(source_record, cfg)
    cached = Path(cache_dir) / "baseline-eval" / key
    if (cached / "summary.json").is_file():
        with atomic_directory(out_dir) as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True)
            write_json_atomic(tmp / "cache.json", {"key": key, "from": str(cached)})
        return load_result("baseline", out_dir, cached=True)
    result = evaluate_model("baseline", model_dir, cfg, out_dir, on_gpu=on_gpu, report=report)
    with atomic_directory(cached) as tmp:
        shutil.copytree(out_dir, tmp, dirs_exist_ok=True)
    return result
