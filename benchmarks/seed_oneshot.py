"""The seed tutorial's quantization as a bare script: no Prefect, no cache, no checks.

It is the baseline the pipeline is measured against (benchmarks/bench_quantization_cpu.py). Like
the seed, it renders chat rows with the chat template and pads every sample to max length;
--no-pad isolates the cost of that padding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datasets import load_dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # SmolLM2 has none; the usual fix, as in the seed
        tokenizer.pad_token = tokenizer.eos_token
    ds = load_dataset("json", data_files=args.dataset, split="train")
    ds = ds.shuffle(seed=42).select(range(args.samples))
    ds = ds.map(lambda r: {"text": tokenizer.apply_chat_template(r["messages"], tokenize=False)})
    ds = ds.map(
        lambda r: tokenizer(r["text"], padding="max_length" if args.pad else False,
                            max_length=args.max_seq_len, truncation=True,
                            add_special_tokens=False),
        remove_columns=ds.column_names,
    )
    recipe = [
        SmoothQuantModifier(smoothing_strength=0.8),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
    ]
    t_oneshot = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.max_seq_len,
            num_calibration_samples=args.samples)
    oneshot_s = time.perf_counter() - t_oneshot
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    tokens = sum(sum(m) for m in ds["attention_mask"])
    print(json.dumps({"oneshot_s": round(oneshot_s, 2),
                      "total_s": round(time.perf_counter() - start, 2),
                      "tokens_forwarded": sum(len(x) for x in ds["input_ids"]),
                      "real_tokens": tokens}))


if __name__ == "__main__":
    main()
