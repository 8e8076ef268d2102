"""The quantization stage's memory, planned from the model's config and the settings before
anything is loaded: a 70B job that cannot fit is refused in a second with the numbers and the
setting to change, instead of running out of memory an hour in.

What the single pass holds (docs/quantization.md, "Memory"): the model's weights in host memory
in the dtype calibration computes in (bf16 on a GPU or a CPU with native bf16, fp32 otherwise),
one copy when the single pass runs on the ranks (rank 0 reads it, the others receive each layer:
``requant.quantization.weights_home``), else one per rank; the hidden states of every calibration
token between two layers (on the GPU when they fit half of it, else in host memory); on the GPU,
one decoder layer, its Hessians and a batch (``gpu_memory.quantization_need_bytes``). Ranks
running the single pass keep the one copy in host memory like one process; only llm-compressor's
pipeline puts a weight replica on each GPU, and only when it takes at most 40 % of the GPU
(``requant.quantization.rank.weights_device``). The figure is an upper-bound estimate:
the demo model's plan is checked against its measured peak (tests/test_memory_plan.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.errors import SettingsError
from requant.gpu_memory import GIB, quantization_need_bytes
from requant.quantization.single_pass import (  # tokens per calibration forward
    BATCH_TOKENS,
    weights_read_once,
)
from requant.quantization.weights_home import model_skeleton

#: Python, torch, transformers and llm-compressor themselves, before any tensor (the demo's
#: process measures ~1 GiB of it).
PROCESS_BYTES = 2 * GIB
#: Share of a GPU's memory a replica of the weights may take (llm-compressor's ranks); the
#: rest is for activations.
REPLICA_BUDGET = 0.4


@dataclass(frozen=True)
class MemoryPlan:
    params: int
    weight_bytes: int  # one copy, in the compute dtype
    copies: int  # host copies of the weights
    activation_bytes: int
    activations_on_gpu: bool
    host_bytes: int
    gpu_bytes_per_rank: int | None  # None: no GPU

    def describe(self) -> str:
        acts = f"activations {self.activation_bytes / GIB:.1f} GiB on the " + (
            "GPU" if self.activations_on_gpu else "host")
        return (f"{self.params / 1e9:.2f} B parameters: weights {self.weight_bytes / GIB:.1f} "
                f"GiB x {self.copies} cop{'y' if self.copies == 1 else 'ies'}, {acts}; host "
                f"{self.host_bytes / GIB:.1f} GiB" + (
                    f", GPU {self.gpu_bytes_per_rank / GIB:.1f} GiB per rank"
                    if self.gpu_bytes_per_rank is not None else ""))


def count_params(config: dict[str, Any]) -> int:
    """Decoder-only transformer parameters from config.json (Llama, Qwen, Mistral, Gemma...)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    inter = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    per_layer = attention + 3 * hidden * inter * experts + 2 * hidden
    embeddings = config["vocab_size"] * hidden
    lm_head = 0 if config.get("tie_word_embeddings", False) else embeddings
    return layers * per_layer + embeddings + lm_head + hidden


def plan_memory(config: dict[str, Any], *, gpus: int, on_gpu: bool, fp32: bool, samples: int,
                max_seq_len: int, gpu_total: int | None,
                pipeline: str = "single-pass", read_once: bool = False,
                kept_inputs: bool = False) -> MemoryPlan:
    """``read_once``: the single pass runs on the ranks, rank 0 alone holds the weights
    (``single_pass.weights_read_once``); otherwise each rank holds a copy. ``kept_inputs``:
    a copy of the activations waits in host memory while it is written
    (``quantization.resume_inputs_every``)."""
    params = count_params(config)
    weights = params * (4 if fp32 else 2)
    ranks = max(gpus, 1)
    activations = samples * max_seq_len * config["hidden_size"] * (4 if fp32 else 2)
    layer_need = quantization_need_bytes(_Config(config), BATCH_TOKENS)
    per_rank_acts = activations // ranks
    from requant.quantization.oneshot import GPU_CACHE_BUDGET  # the stage's own rule

    acts_on_gpu = on_gpu and gpu_total is not None and \
        per_rank_acts <= GPU_CACHE_BUDGET * max(gpu_total - layer_need, 0)
    replica = ranks > 1 and pipeline == "llm-compressor" and gpu_total is not None and \
        weights <= REPLICA_BUDGET * gpu_total
    gpu = None
    if on_gpu:
        gpu = layer_need + (per_rank_acts if acts_on_gpu else 0) + (weights if replica else 0)
    copies = 1 if read_once else ranks
    host = weights * copies + (0 if acts_on_gpu else activations) + PROCESS_BYTES * ranks \
        + (activations if kept_inputs else 0)
    return MemoryPlan(params, weights, copies, activations, acts_on_gpu, host, gpu)


class _Config:
    """config.json as the attributes ``quantization_need_bytes`` reads."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.hidden_size = config["hidden_size"]
        self.intermediate_size = config.get("intermediate_size", 4 * self.hidden_size)


def available_host_bytes() -> int | None:
    """MemAvailable: what the kernel can give without swapping (None where unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory_plan(plan: MemoryPlan, host_available: int | None,
                      gpu_total: int | None) -> None:
    """Refuse, naming the numbers and the settings that change them, what cannot fit."""
    fixes = ("Run on a machine with more memory, or lower calibration.num_samples / "
             "calibration.max_seq_len (the activations)")
    if host_available is not None and plan.host_bytes > host_available:
        more = " or quantization.gpus=1 (one copy of the weights)" if plan.copies > 1 else ""
        raise SettingsError(
            f"quantization: the plan needs {plan.host_bytes / GIB:.1f} GiB of host memory and "
            f"this machine has {host_available / GIB:.1f} GiB available ({plan.describe()}). "
            f"{fixes}{more}.")
    if plan.gpu_bytes_per_rank is not None and gpu_total is not None \
            and plan.gpu_bytes_per_rank > gpu_total:
        raise SettingsError(
            f"quantization: the plan needs {plan.gpu_bytes_per_rank / GIB:.1f} GiB per GPU and "
            f"each has {gpu_total / GIB:.1f} GiB ({plan.describe()}). {fixes}.")


def plan_for_source(model_dir: Path, settings: Any, on_gpu: bool, fp32: bool,
                    gpu_total: int | None, calibrates: bool = True,
                    recipe_text: str | None = None) -> MemoryPlan:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config if "hidden_size" in config else config.get("text_config", config)
    return plan_memory(config, gpus=settings.quantization.gpus, on_gpu=on_gpu, fp32=fp32,
                       samples=settings.calibration.num_samples if calibrates else 0,
                       max_seq_len=settings.calibration.max_seq_len, gpu_total=gpu_total,
                       pipeline=settings.quantization.pipeline,
                       read_once=reads_once(model_dir, settings, recipe_text),
                       kept_inputs=keeps_inputs(settings) and calibrates)


def keeps_inputs(settings: Any) -> bool:
    """Whether the single pass will keep layer inputs for resuming (one process only)."""
    q = settings.quantization
    return bool(q.resume and q.resume_inputs_every and q.gpus <= 1
                and q.pipeline == "single-pass")


def reads_once(model_dir: Path, settings: Any, recipe_text: str | None) -> bool:
    q = settings.quantization
    return bool(q.gpus > 1 and q.pipeline == "single-pass" and recipe_text is not None
                and weights_read_once(model_skeleton(Path(model_dir),
                                                     settings.source.trust_remote_code, None),
                                      recipe_text))
