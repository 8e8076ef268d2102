"""GPU: the pipeline's quantization vs plain llm-compressor oneshot, on a Llama-3-8B-shaped model.

The model is built from Llama-3-8B's config with random weights (no Hub here) and calibrated on
random tokens, which costs exactly what real ones do. Variants, each on a fresh copy of the same
weights (same seed):
  seed      plain ``oneshot(...)`` as the seed tutorial calls it (llm-compressor defaults)
  requant   ``requant.quantization.oneshot.quantize_model``, the pipeline's call: since
            2026-11-26 the single pass (requant.quantization.single_pass; TF32, activations
            on GPU)
  requant-two-pass  the same call with ``pipeline="llm-compressor"``: llm-compressor's own
            pipeline, one pass per modifier (the pipeline's call until 2026-11-26)
  requant-notf32 / requant-cpucache: one choice at a time, to attribute the gain
  requant-store  the single pass keeping each finished layer under --store (quantization.resume):
            its cost; run again after a kill (REQUANT_KILL_AT=layer-15-recorded) it resumes
            (benchmarks/bench_quantization_resume_gpu.sh)

Per run: wall time, peak GPU memory, the time of each modifier's calibration pass and GPTQ's
solve time (from llm-compressor's own log lines). With --compare A B, the int8 weights of two
variants are compared (fraction identical, fraction off by one step).

Usage (device machine):
  python benchmarks/bench_quantization_gpu.py --samples 64 --variants seed requant \
      --compare seed requant --out $OUT/gpu.json
  python benchmarks/bench_quantization_gpu.py --tiny --samples 4 --variants seed requant  # smoke
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(  # meta-llama/Meta-Llama-3-8B-Instruct config.json
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009,
    tie_word_embeddings=False,
)
LLAMA3_70B = dict(  # meta-llama/Meta-Llama-3-70B-Instruct config.json
    LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8,
)
TINY = dict(LLAMA3_8B, vocab_size=4096, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def make_tokenizer():
    """Self-contained: a byte-level BPE trained on the repository's GSM8K text in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = (ROOT / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:500]
    tok.train_from_iterator([json.loads(line)["question"] for line in lines], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def build_model(config_kwargs: dict, config_dir: Path, device: str):
    """Same seed, same weights every call; built on the GPU (fast init), then moved to host RAM
    where the pipeline loads models too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to("cpu")
    model.config.name_or_path = str(config_dir)  # oneshot re-reads the config from here
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model


def random_dataset(samples: int, seq_len: int, vocab: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * samples})


class LogClock:
    """Timestamps of llm-compressor's own log lines: which modifier's pass ran when."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.gptq_solve_s = 0.0  # GPTQ's per-module solves (METRIC "time")
        self.gptq_error = 0.0  # sum of GPTQ's per-module reconstruction losses (METRIC "error")

    def __call__(self, message) -> None:
        text = message.record["message"]
        if re.match(r"Inferred `\w+` for `\w+`|Compression lifecycle finalized", text):
            self.events.append((time.perf_counter(), text))
        if message.record["level"].name == "METRIC":
            if m := re.match(r"time ([0-9.]+)s", text):
                self.gptq_solve_s += float(m.group(1))
            elif m := re.match(r"error ([0-9.]+)", text):
                self.gptq_error += float(m.group(1))


def run_variant(name: str, args, config_dir: Path, tokenizer, recipe_text: str, device: str):
    import torch
    from loguru import logger

    from requant.memory import peak_rss_gib
    from requant.quantization.hardware import detect_accelerator
    from requant.quantization.oneshot import quantize_model
    from requant.quantization.resume import LayerStore

    shape = TINY if args.tiny else LLAMA3_70B if args.shape == "70b" else LLAMA3_8B
    if args.layers:  # the first N decoder layers of the shape: per-layer cost, projected
        shape = dict(shape, num_hidden_layers=args.layers)
    model = build_model(shape, config_dir, device)
    dataset = random_dataset(args.samples, args.seq_len, model.config.vocab_size)
    clock = LogClock()
    sink = logger.add(clock, level="INFO")
    acc = detect_accelerator("auto")
    torch.backends.cuda.matmul.allow_tf32 = False  # each variant starts from torch's default
    start = time.perf_counter()
    choices: dict = {}
    if name == "seed":
        from llmcompressor import oneshot

        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe_text,
                max_seq_length=args.seq_len, num_calibration_samples=args.samples)
    else:
        choices = quantize_model(
            model, tokenizer, recipe_text, dataset, args.seq_len, acc,
            allow_tf32=name != "requant-notf32",
            activation_cache="cpu" if name == "requant-cpucache" else "auto",
            pipeline="llm-compressor" if name == "requant-two-pass" else "single-pass",
            store=LayerStore(args.store, args.inputs_every) if name == "requant-store"
            else None,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    logger.remove(sink)
    passes = {}
    marks = [(start, "setup"), *clock.events, (start + wall, "end")]
    for (t0, label), (t1, _) in itertools.pairwise(marks):
        passes[label[:80]] = round(t1 - t0, 1)
    result = {
        "variant": name, "samples": args.samples, "seq_len": args.seq_len,
        "shape": "tiny" if args.tiny else args.shape,
        "layers": model.config.num_hidden_layers,
        "wall_s": round(wall, 1), "per_sample_s": round(wall / args.samples, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.startswith("cuda") else None,
        "gptq_solve_s": round(clock.gptq_solve_s, 1),
        "gptq_error_sum": round(choices.get("gptq_loss", clock.gptq_error), 2),
        "phases_s": passes, "choices": choices,
        "peak_host_rss_gib_so_far": peak_rss_gib(),  # the process's peak: run one variant alone
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
    }
    print(json.dumps(result), flush=True)
    int8 = quantized_codes(model)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result, int8


def quantized_codes(model) -> dict:
    """Integer codes of every quantized Linear (weights are stored fake-quantized after GPTQ)."""
    import torch

    codes = {}
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if isinstance(module, torch.nn.Linear) and scale is not None:
            w = module.weight.detach().float().cpu()
            codes[name] = torch.round(w / scale.detach().float().cpu()).clamp(-128, 127).to(
                torch.int8)
    return codes


def compare(a: dict, b: dict) -> dict:
    import torch

    same = off1 = total = 0
    for name, qa in a.items():
        diff = (qa.int() - b[name].int()).abs()
        same += int((diff == 0).sum())
        off1 += int((diff == 1).sum())
        total += diff.numel()
    return {"modules": len(a), "identical": round(same / total, 5),
            "off_by_one": round(off1 / total, 5), "further": round(1 - (same + off1) / total, 6),
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=["seed", "requant"])
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke test")
    p.add_argument("--shape", choices=["8b", "70b"], default="8b",
                   help="Llama-3-8B's or Llama-3-70B's config")
    p.add_argument("--layers", type=int, default=None,
                   help="only the first N decoder layers (per-layer time and memory at a shape "
                   "too big for one bounded run)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer folder; default: a small BPE trained here on GSM8K text "
                   "(calibration uses random token ids, the tokenizer only rides along)")
    p.add_argument("--store", type=Path, default=ROOT / "runs" / "bench-layer-store",
                   help="requant-store: where finished layers are kept (a rerun resumes there)")
    p.add_argument("--inputs-every", type=int, default=8,
                   help="requant-store: keep the next layer's inputs every N layers "
                   "(quantization.resume_inputs_every; 0: never)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from requant.quantization.recipes import resolve_recipe
    from requant.quantization.smoothing import fit_to_model
    from requant.settings import QuantizationSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer \
        else make_tokenizer()
    recipe = resolve_recipe(QuantizationSettings())  # the seed recipe, as the pipeline builds it
    fitted = fit_to_model(recipe, "llama")  # as the pipeline runs it: SmoothQuant mappings named
    results, codes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            text = fitted.text if name.startswith("requant") else recipe.text
            result, codes[name] = run_variant(name, args, Path(tmp), tokenizer, text, device)
            results.append(result)
            if args.compare and name not in args.compare:
                codes.pop(name)
    report = {"results": results}
    if args.compare:
        report["weights_" + "_vs_".join(args.compare)] = compare(*(codes[n] for n in args.compare))
        print(json.dumps(report["weights_" + "_vs_".join(args.compare)]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
