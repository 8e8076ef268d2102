"""GPU: data-parallel calibration (``quantization.gpus``) on the Llama-3-8B-shaped model.

Variants, all on the same random bf16 weights and random tokens (see bench_quantization_gpu.py):
  1      the pipeline's single-GPU call (``quantize_model`` in this process, weights in host RAM)
  N > 1  ``requant.quantization.distributed.run_ranks`` with N ranks, exactly as the
         quantization stage launches them (torchrun, NCCL): requant's single pass, data-parallel
         (``--pipeline single-pass``, the default), or llm-compressor's pipeline with one weight
         replica per GPU (``--pipeline llm-compressor``)

Per variant: wall time of the calibration call (model load by the ranks included: the stage pays
it), speed-up and scaling efficiency against the single-GPU call of the same invocation or of
an earlier one on the same machine (--out accumulates), peak GPU memory per rank, peak host RSS
per rank, GPTQ's summed reconstruction loss (llm-compressor's own METRIC lines), and the INT8
codes compared with the single-GPU call. --repeat runs each N > 1 twice and compares the two
checkpoints bit for bit.

Usage (device machine; the model and data are built once into .bench-cache/):
  python benchmarks/bench_quantization_multigpu.py --samples 512 --gpus 2 --out $OUT/mg.json
  python benchmarks/bench_quantization_multigpu.py --samples 512 --gpus 1 --out $OUT/mg.json
  python benchmarks/bench_quantization_multigpu.py --tiny --samples 8 --gpus 1 2  # smoke
  # no GPU: two gloo ranks on a 0.3 B model, where each rank's host memory shows what it read
  python benchmarks/bench_quantization_multigpu.py --small --samples 16 --seq-len 256 --gpus 1 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quantization_gpu import (  # noqa: E402
    LLAMA3_8B,
    TINY,
    LogClock,
    build_model,
    make_tokenizer,
    random_dataset,
)

from requant.quantization.single_pass import BATCH_TOKENS  # noqa: E402

#: A 0.3 B Llama (1.2 GB in fp32): big enough that a rank holding the model shows in its RSS.
SMALL = dict(LLAMA3_8B, vocab_size=32000, hidden_size=1024, intermediate_size=4096,
             num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2)

METRIC_ERROR = re.compile(r"\| METRIC - error ([0-9.]+)")


def prepare(cache: Path, args: argparse.Namespace, device: str) -> tuple[Path, Path]:
    """The model and the calibration set on disk, as the stage finds them."""
    model_dir, data_dir = cache / "model", cache / f"data-{args.samples}x{args.seq_len}"
    if not (model_dir / "model.safetensors.index.json").exists() and \
            not (model_dir / "model.safetensors").exists():
        model = build_model(shape(args), model_dir, device)
        model.save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        del model
    if not data_dir.exists():
        vocab = shape(args)["vocab_size"]
        random_dataset(args.samples, args.seq_len, vocab).save_to_disk(str(data_dir))
    return model_dir, data_dir


def shape(args: argparse.Namespace) -> dict:
    return TINY if args.tiny else SMALL if args.small else LLAMA3_8B


def recipe_text() -> str:
    from requant.quantization.recipes import resolve_recipe
    from requant.quantization.smoothing import fit_to_model
    from requant.settings import QuantizationSettings

    return fit_to_model(resolve_recipe(QuantizationSettings()), "llama").text


def run_single(model_dir: Path, data_dir: Path, args: argparse.Namespace,
               work: Path, batch_tokens: int) -> tuple[dict, dict]:
    import llmcompressor.logger  # noqa: F401 - it resets loguru's sinks when first imported
    import torch
    from datasets import load_from_disk
    from loguru import logger

    from requant.memory import peak_rss_gib
    from requant.quantization.hardware import detect_accelerator
    from requant.quantization.oneshot import (
        compute_dtype,
        load_model,
        quantize_model,
        restore_source_dtype,
    )

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = LogClock()
    sink = logger.add(clock, level="INFO")
    start = time.perf_counter()
    acc = detect_accelerator("auto")
    model, tokenizer = load_model(model_dir, dtype=compute_dtype(acc) or "auto")  # as the stage
    loaded = time.perf_counter()
    choices = quantize_model(model, tokenizer, recipe_text(), load_from_disk(str(data_dir)),
                             args.seq_len, acc, batch_tokens=batch_tokens)
    if on_gpu:
        torch.cuda.synchronize()
    calibrated = time.perf_counter()
    restore_source_dtype(model, model_dir, compute_dtype(acc))
    model.save_pretrained(work / "checkpoint", save_compressed=True)  # the stage saves too
    wall = time.perf_counter() - start
    logger.remove(sink)
    result = {"gpus": 1, "call": "in-process quantize_model + save (the gpus=1 stage)",
              "batch_tokens": batch_tokens,
              "pipeline": choices.get("pipeline"), "phases_s": choices.get("phases_s"),
              "wall_s": round(wall, 1), "calibrate_s": round(calibrated - loaded, 1),
              "seconds": {"load": round(loaded - start, 2),
                          "calibrate": round(calibrated - loaded, 2),
                          "save": round(wall - (calibrated - start), 2)},
              "gptq_error_sum": round(choices.get("gptq_loss") or clock.gptq_error, 2),
              "peak_gpu_gib": [round(torch.cuda.max_memory_allocated() / 2**30, 2)
                               if on_gpu else None],
              "peak_host_rss_gib": [peak_rss_gib()],
              "smoothing_check": choices.get("smoothing_check")}
    return result, saved_codes(work / "checkpoint")  # as saved, like the ranks' checkpoint


def run_multi(n: int, model_dir: Path, data_dir: Path, args: argparse.Namespace,
              work: Path, device: str) -> tuple[dict, dict]:
    from requant.quantization.distributed import RankJob, run_ranks

    save_to = work / "checkpoint"
    save_to.mkdir(parents=True)
    job = RankJob(model_dir=str(model_dir), calibration_dir=str(data_dir),
                  recipe_text=recipe_text(), max_seq_len=args.seq_len, device=device, world=n,
                  save_to=str(save_to), work_dir=str(work / "ranks"), pipeline=args.pipeline)
    start = time.perf_counter()
    out = run_ranks(job)
    wall = time.perf_counter() - start
    logs = sorted((work / "ranks" / "logs").glob("**/attempt_*/*/*.log"))  # loguru: stdout
    error = sum(float(m.group(1)) for log in logs
                for m in METRIC_ERROR.finditer(log.read_text(errors="replace")))
    result = {"gpus": n, "call": "run_ranks (torchrun, NCCL), as the stage launches it",
              "pipeline": out.get("pipeline"), "phases_s": out.get("phases_s"),
              "wall_s": round(wall, 1), "seconds": out.get("rank_seconds"),
              "calibrate_s": (out.get("rank_seconds") or {}).get("calibrate"),
              "gptq_error_sum": round(out.get("gptq_loss") or error, 2),
              "peak_gpu_gib": [r["gpu_allocated"] for r in out["ranks"]],
              "peak_host_rss_gib": [r["host_rss"] for r in out["ranks"]],
              "weights_per_rank": [r.get("weights") for r in out["ranks"]],
              "seconds_per_rank": [r.get("seconds") for r in out["ranks"]],
              "smoothing_check": out.get("smoothing_check")}
    return result, saved_codes(save_to)


def saved_codes(path: Path) -> dict:
    """INT8 codes as saved (compressed checkpoint), keyed by module name."""
    from safetensors import safe_open

    codes = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith(".weight"):
                    t = f.get_tensor(key)
                    if str(t.dtype) == "torch.int8":
                        codes[key.removesuffix(".weight")] = t
    return codes


def agreement(a: dict, b: dict) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    same = total = worst = 0
    for name, qa in a.items():
        diff = (qa.to(dev).int() - b[name].to(dev).int()).abs()
        same += int((diff == 0).sum())
        total += diff.numel()
        worst = max(worst, int(diff.max()))
    return {"modules": len(a), "identical": round(same / total, 6), "max_steps": worst,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", action="store_true", help="run each N > 1 twice, compare bits")
    p.add_argument("--batch-tokens", type=int, nargs="+", default=[BATCH_TOKENS],
                   help="1 GPU: one run per value; the codes of each are compared with the "
                        "first's (how far a mere change of summation order moves them)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--small", action="store_true", help="a 0.3 B model (CPU runs)")
    p.add_argument("--pipeline", choices=["single-pass", "llm-compressor"], default="single-pass",
                   help="what the N > 1 ranks run (1 GPU: always the stage's own choice)")
    p.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "multigpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch

    cache = args.cache / ("tiny" if args.tiny else "small" if args.small else "8b")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir, data_dir = prepare(cache, args, device)
    report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    runs = report.setdefault("runs", [])
    codes_dir = cache / f"codes-{args.samples}x{args.seq_len}-{args.pipeline}"
    codes_dir.mkdir(exist_ok=True)
    for n, attempt, batch_tokens in variants(args):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            if n == 1:
                result, codes = run_single(model_dir, data_dir, args, Path(tmp), batch_tokens)
            else:
                result, codes = run_multi(n, model_dir, data_dir, args, Path(tmp), device)
        result.update(samples=args.samples, seq_len=args.seq_len, attempt=attempt,
                      gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
        first_1 = n == 1 and batch_tokens == args.batch_tokens[0]
        mine = codes_dir / (f"gpus-{n}.pt" if n > 1 or first_1 else f"gpus-1-bt{batch_tokens}.pt")
        if attempt == 1:
            result["codes_vs_attempt_0"] = agreement(torch.load(mine), codes)
        torch.save(codes, mine)
        runs.append(result)
        print(json.dumps(result), flush=True)
    one = codes_dir / "gpus-1.pt"
    if one.exists():  # whichever call ran the single-GPU variant
        report[f"codes_vs_1_gpu_{args.samples}x{args.seq_len}"] = {
            f.stem: agreement(torch.load(one), torch.load(f))
            for f in sorted(codes_dir.glob("gpus-*.pt")) if f != one}
    add_scaling(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def variants(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(GPUs, attempt, batch tokens) of each run, in order."""
    out = []
    for n in args.gpus:
        if n == 1:
            out += [(1, 0, bt) for bt in args.batch_tokens]
        else:
            out += [(n, attempt, args.batch_tokens[0])
                    for attempt in range(2 if args.repeat else 1)]
    return out


def add_scaling(report: dict) -> None:
    """Speed-up and efficiency of each N > 1 run against the single-GPU call of the same shape."""
    for r in report["runs"]:
        base = next((b for b in report["runs"] if b["gpus"] == 1 and b.get("attempt") == 0
                     and (b["samples"], b["seq_len"]) == (r["samples"], r["seq_len"])), None)
        if base and r["gpus"] > 1:
            r["speedup_vs_1_gpu"] = round(base["wall_s"] / r["wall_s"], 2)
            r["scaling_efficiency"] = round(base["wall_s"] / r["wall_s"] / r["gpus"], 3)
            r["gptq_error_vs_1_gpu"] = round(r["gptq_error_sum"] / base["gptq_error_sum"] - 1, 4) \
                if base["gptq_error_sum"] else None


if __name__ == "__main__":
    main()
