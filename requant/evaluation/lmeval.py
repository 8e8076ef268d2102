"""Running lm-eval against the model as vLLM serves it, and the record of what it found.

We evaluate what we will ship: the checkpoint runs in a real vLLM server (serving environment,
a process) and lm-eval's ``local-completions`` model sends it tokenized requests over HTTP, so
``add_bos_token`` takes effect exactly as configured. A record keeps every question's score for
every metric (the gate's paired evidence) and ``evaluated_with``: everything that changes a
score, so the gate can refuse to compare unlike records and the baseline cache can key on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from requant.atomic import write_json_atomic
from requant.errors import ServerError, SettingsError
from requant.evaluation.gate import EvidenceRecord, rule_key
from requant.evaluation.progress import RequestCounter, counting_completions_model
from requant.evaluation.task_files import (
    effective_looks,
    task_data_hashes,
    task_dir,
    task_fewshot,
    task_limit,
    task_manager,
)
from requant.hashing import fingerprint
from requant.progress import Report, no_progress, polling
from requant.quantization.hardware import cpu_has_native_bf16
from requant.serving.server import effective_flags, log_tail, serving_python
from requant.settings import EvaluationSettings, GateSettings, ServerSettings


@dataclass(frozen=True)
class ModelEvaluation:
    label: str  # "baseline" | "candidate"
    model: str
    per_doc: dict[str, dict[int, float]]  # "task|metric,filter" -> question -> score
    totals: dict[str, int]  # task -> questions in its (limited) set
    evaluated_with: dict[str, Any]
    result_dir: Path
    cached: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)
    stages: int = 0
    prompts: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> question -> hash

    def scores(self) -> dict[str, float]:
        return {k: sum(v.values()) / len(v) for k, v in self.per_doc.items() if v}

    def score(self, task: str, metric: str) -> float | None:
        return self.scores().get(rule_key(task, metric))

    def evidence(self) -> EvidenceRecord:
        return EvidenceRecord(self.per_doc, self.evaluated_with, self.totals, self.prompts)

    def as_record(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "scores": self.scores(),
                "questions": {k: len(v) for k, v in self.per_doc.items()},
                "totals": self.totals, "evaluated_with": self.evaluated_with,
                "result_dir": str(self.result_dir), "cached": self.cached,
                "timings_s": self.timings_s, "stages": self.stages}


def save_record(folder: Path, evaluation: ModelEvaluation) -> None:
    write_json_atomic(folder / "summary.json", evaluation.as_record())
    write_json_atomic(folder / "per_doc.json", {k: {str(d): s for d, s in v.items()}
                                                for k, v in evaluation.per_doc.items()})
    write_json_atomic(folder / "prompts.json", {k: {str(d): h for d, h in v.items()}
                                                for k, v in evaluation.prompts.items()})


def load_record(label: str, folder: Path, *, cached: bool) -> ModelEvaluation:
    summary = json.loads((folder / "summary.json").read_text())
    per_doc = {k: {int(d): s for d, s in v.items()}
               for k, v in json.loads((folder / "per_doc.json").read_text()).items()}
    prompts_file = folder / "prompts.json"
    prompts = {k: {int(d): h for d, h in v.items()}
               for k, v in json.loads(prompts_file.read_text()).items()} \
        if prompts_file.is_file() else {}
    return ModelEvaluation(label, summary["model"], per_doc, summary["totals"],
                           summary["evaluated_with"], folder, cached, summary["timings_s"],
                           summary["stages"], prompts)


@lru_cache(maxsize=8)
def serving_vllm_version(python: str) -> str:
    """The vLLM the evaluation servers run (the serving environment's, not ours)."""
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                         capture_output=True, text=True, check=False, timeout=120)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def evaluated_with(cfg: EvaluationSettings, gate: GateSettings, on_gpu: bool) -> dict[str, Any]:
    """Everything that changes a score or the questions asked; equal for comparable records.
    ``on_gpu``: whether the evaluation servers run on the GPU (the run's accelerator), which
    decides flags the settings leave open (eager, dtype) and what they compute on."""
    server: ServerSettings = cfg.server
    return {
        "tasks": list(cfg.tasks),
        "task_files": fingerprint(task_data_hashes(task_dir(cfg))),
        "num_fewshot": {t: task_fewshot(cfg, t) for t in cfg.tasks},
        "limits": {t: task_limit(cfg, t) for t in cfg.tasks},
        "max_gen_toks": cfg.max_gen_toks,
        "add_bos_token": cfg.add_bos_token,
        "backend": cfg.backend,
        "server": server.model_dump(mode="json", include={
            "max_model_len", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
            "extra_args"}),
        "server_flags": effective_flags(server, on_gpu),  # as started, not as configured
        "server_env": dict(sorted(server.env.items())),  # batch invariance, attention backend
        "lm_eval": metadata.version("lm_eval"),
        "transformers": metadata.version("transformers"),  # the prompts' tokenizer code
        "datasets": metadata.version("datasets"),
        "vllm": serving_vllm_version(str(serving_python(server))),
        "hardware": hardware_name(on_gpu),
        "cpu_native_bf16": cpu_has_native_bf16(),  # else CPU servers compute in fp32
        "looks": effective_looks(cfg, gate),
        "order_seed": gate.order_seed,
    }


def hardware_name(on_gpu: bool) -> str:
    """What the evaluation servers compute on: scores move with the kernels (a cached baseline
    from another GPU model or CPU is never reused, nor compared). The host's CPU where they do
    not run on its GPU."""
    from requant.quantization.hardware import detect_accelerator

    acc = detect_accelerator("auto" if on_gpu else "cpu")
    return f"{acc.kind}: {acc.name}"


def tokenizer_fingerprint(model_dir: Path) -> str:
    """What the model's tokenizer does, not how its files are formatted (a quantized checkpoint
    re-saves them): vocabulary, special tokens, and the ids of a probe text. The requests are
    tokenized on our side, so two models compared must tokenize alike. Loaded once per folder
    and state of its files (a candidate resumed stage by stage asks again)."""
    folder = Path(model_dir)
    files = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                         for p in folder.iterdir() if p.is_file() and p.suffix != ".safetensors"))
    return _tokenizer_fingerprint(str(folder.resolve()), files)


@lru_cache(maxsize=16)
def _tokenizer_fingerprint(model_dir: str, files: tuple[tuple[str, int, int], ...]) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = "Natalia sold clips to 48 of her friends in April. 12 + 7 = 19\n\nQ: A:"
    return fingerprint({"vocab": sorted(tok.get_vocab().items()),
                        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
                        "bos": tok.bos_token_id, "eos": tok.eos_token_id,
                        "probe": tok(probe)["input_ids"]})[:16]


def prompt_hashes(samples: list[dict[str, Any]]) -> dict[int, str]:
    """question -> lm-eval's hash of the question and of the exact prompt it was asked with
    (few-shot examples included): the proof that two records are paired question by question."""
    return {int(row["doc_id"]): f"{row.get('doc_hash', '')}/{row.get('prompt_hash', '')}"
            for row in samples if row.get("prompt_hash")}


def baseline_cache_key(source_record: dict[str, Any], with_: dict[str, Any]) -> str:
    return fingerprint({"source": {k: source_record.get(k) for k in ("model", "revision",
                                                                    "files")},
                        "evaluated_with": with_})


def per_doc_scores(task: str, samples: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """rule key -> question -> score, for every metric and filter lm-eval logged."""
    out: dict[str, dict[int, float]] = {}
    for row in samples:
        for metric in row.get("metrics") or []:
            value = row.get(metric)
            if isinstance(value, bool | int | float):
                key = rule_key(task, f"{metric},{row.get('filter', 'none')}")
                out.setdefault(key, {})[int(row["doc_id"])] = float(value)
    return out


def run_lm_eval_on_server(
    tokenizer_dir: Path, base_url: str, served_name: str, cfg: EvaluationSettings,
    include_path: Path | None, task: str, questions: list[int], label: str = "model",
    report: Report = no_progress,
) -> dict[str, Any]:
    """One task, the given questions (lm-eval's ``samples``), through the running server."""
    import lm_eval

    counter = RequestCounter(base_url, f"{label} {task}", report)
    model = counting_completions_model(
        counter, model=served_name, base_url=f"{base_url}/v1/completions",
        tokenizer=str(tokenizer_dir), tokenizer_backend="huggingface",
        tokenized_requests=True,  # needed for add_bos_token to reach the server
        add_bos_token=cfg.add_bos_token, num_concurrent=cfg.num_concurrent, max_retries=3,
        max_gen_toks=cfg.max_gen_toks, max_length=cfg.server.max_model_len, timeout=600,
    )
    with polling(counter.poll):
        results = lm_eval.simple_evaluate(
            model=model, tasks=[task], num_fewshot=task_fewshot(cfg, task),
            samples={task: questions}, log_samples=True,
            task_manager=task_manager(include_path, [task]),
        )
    counter.poll()
    return results


def model_arg(field: str, value: object) -> str:
    """A value for lm-eval's ``k=v,k=v`` string: one that would split it (a comma, an '=') or
    start an option is refused, so no path or name becomes another model argument."""
    text = str(value)
    if any(c in text for c in ",=\n") or text.startswith("-"):
        raise SettingsError(f"{field}: {text!r:.120} holds a character lm-eval's argument "
                            "string would split on (',' '=' or a leading '-'). Rename it.")
    return text


def run_lm_eval_in_vllm(
    model: Path, cfg: EvaluationSettings, include_path: Path | None, out: Path, log: Path,
) -> dict[str, Any]:
    """The seed's command (lm_eval --model vllm ...) in the serving environment's process:
    every task in one go, one look for the gate."""
    args = {"pretrained": str(model), "add_bos_token": cfg.add_bos_token,
            "max_model_len": cfg.server.max_model_len, "max_gen_toks": cfg.max_gen_toks,
            "enforce_eager": cfg.server.enforce_eager is not False}
    cmd = [str(serving_python(cfg.server)), "-m", "lm_eval", "--model", "vllm",
           "--model_args",
           ",".join(f"{k}={model_arg(k, v)}" for k, v in args.items()),
           "--tasks", ",".join(model_arg("evaluation.tasks", t) for t in cfg.tasks),
           "--num_fewshot", str(cfg.num_fewshot),
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
