"""SmoothQuant exactness per architecture: llm-compressor's own mappings against requant's.

For each supported model_type a tiny random-weight model is built from its real config class
(tests/tinymodels.py: 2 layers, norms moved away from their initial values), in fp32 and bf16.
SmoothQuant 0.8 alone runs on 16 random-token samples, then the relative change of the logits on
4 of them (128 tokens each) is measured, as the pipeline's check does:
  llmcompressor  the recipe without mappings: llm-compressor picks them by architecture name
  requant        the recipe requant runs: mappings named per model_type (fit_recipe) and offset
                 norms (Gemma's x̂ · (1 + w)) handled by plain_norms

Usage: .venvs/pipeline/bin/python benchmarks/bench_smoothing_exactness.py
       [--out docs/measurements/smoothing-exactness.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ("quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier:\n"
          "      smoothing_strength: 0.8\n")


def demo_ids(tokenizer, n: int = 32) -> list[list[int]]:
    """The demo's own calibration rows (chat-formatted GSM8K), cut to 256 tokens."""
    lines = (ROOT / "data/calibration/gsm8k-chat-1k.jsonl").read_text().splitlines()[:n]
    return [tokenizer(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False),
                      add_special_tokens=False)["input_ids"][:256] for line in lines]


def drift(model_dir: Path, recipe: str, tokenizer, ids: list[list[int]] | None = None) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from requant.errors import SmoothingNotExact
    from requant.quantization.oneshot import load_model, smooth_checked
    from requant.quantization.smoothing import split_recipe

    torch.manual_seed(1)
    ids = ids or torch.randint(5, len(tokenizer), (16, 128)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    model, tok = load_model(model_dir)
    smooth, _ = split_recipe(recipe)
    try:
        record = smooth_checked(model, smooth, data, None, lambda text: oneshot(
            model=model, processor=tok, recipe=text, dataset=data,
            num_calibration_samples=len(ids), max_seq_length=256,
            shuffle_calibration_samples=False))
        passed = True
    except SmoothingNotExact as exc:  # what the pipeline would stop on
        record, passed = exc.record, False
    return {"passed": passed, "logits": record["logits_rel_change"],
            "max_layer": record["max_layer_update_rel_change"],
            "first_layer_max": max(record["first_layer_balance_rel_change"].values(),
                                   default=None)}


def main() -> None:
    from transformers import AutoTokenizer

    from requant.quantization.smoothing import ARCHITECTURES, fit_recipe
    from tests.conftest import build_tiny_llama
    from tests.tinymodels import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs/measurements/smoothing-exactness.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(Path(tmp) / "tok"))
        for model_type in ARCHITECTURES:
            for dtype in ("float32", "bfloat16"):
                path = build_tiny_model(Path(tmp) / f"{model_type}-{dtype}", model_type,
                                        tokenizer, dtype=dtype)
                fitted, _ = fit_recipe(RECIPE, model_type)
                row = {"model_type": model_type, "dtype": dtype,
                       "llmcompressor": drift(path, RECIPE, tokenizer),
                       "requant": drift(path, fitted, tokenizer)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    demo = ROOT / "models" / "SmolLM2-135M-Instruct"
    if demo.is_dir():  # a real model: 30 bf16 layers, real calibration text
        demo_tok = AutoTokenizer.from_pretrained(demo)
        row = {"model_type": "llama (SmolLM2-135M-Instruct, real weights and data)",
               "dtype": "bfloat16",
               "llmcompressor": drift(demo, RECIPE, demo_tok, demo_ids(demo_tok)),
               "requant": drift(demo, fit_recipe(RECIPE, "llama")[0], demo_tok,
                                demo_ids(demo_tok))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.write_text(json.dumps({"rows": rows, "command":
                                    "benchmarks/bench_smoothing_exactness.py"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
