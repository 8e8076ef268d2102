"""Where a data-parallel single pass keeps the model's weights: read once, by rank 0.

Each rank used to read the whole model from disk into its own host memory: a fixed cost that
does not shrink with more GPUs (~44 s at 8B: the measured limit of scaling) and N host copies
(N x 141 GB at 70B, which no host holds). The single pass needs that copy on one rank only: one
decoder layer at a time is on a GPU, and every rank ends each layer with the same quantized
weights (the solves are broadcast). So rank 0 alone reads the model; the other ranks build its
skeleton on the meta device (no memory, no disk), and each module rank 0 moves onto its GPU is
broadcast into theirs, which drop it again when it is done. Host memory: one model, plus one
layer in flight per rank; disk: one read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.errors import QuantizationFailed
from requant.quantization.ranks import SINGLE, Ranks


@dataclass(frozen=True)
class WeightsHome:
    """``shared``: ranks other than 0 hold a skeleton and receive every module from rank 0.
    Every rank must call ``share`` for the same modules in the same order (a collective)."""

    ranks: Ranks = SINGLE
    device: str = "cpu"
    shared: bool = False

    @property
    def holds_weights(self) -> bool:
        """Whether this rank's host copy is real (it reads stored layers, it saves)."""
        return not self.shared or self.ranks.rank == 0

    def to_device(self, module: Any) -> None:
        if self.holds_weights:
            module.to(self.device)
        else:
            module.to_empty(device=self.device)

    def share(self, module: Any) -> None:
        """Rank 0's values of the module (on the device by now) into every rank's."""
        if not self.shared:
            return
        for tensor in module_tensors(module):
            self.ranks.broadcast_(tensor, 0)

    def to_host(self, module: Any) -> None:
        module.to("cpu" if self.holds_weights else "meta")

    def check_same_model(self, model: Any) -> None:
        """Before the first broadcast: every rank's tensors by name, shape and dtype, or one
        clear error instead of a collective that hangs or fills a tensor with another's bytes."""
        if not self.shared:
            return
        if not self.ranks.agree(model_signature(model)):
            raise QuantizationFailed(
                f"rank {self.ranks.rank}'s model skeleton differs from rank 0's loaded model "
                "(names, shapes or dtypes): the ranks cannot share rank 0's weights. Report "
                "the model's config; quantization.pipeline: llm-compressor reads it on every "
                "rank instead.", self.ranks.rank)


def module_tensors(module: Any) -> list[Any]:
    """Every parameter and buffer in name order, tied ones repeated: the same list on every
    rank, whatever building a skeleton did to the ties."""
    return [t for _, t in sorted(named_tensors(module), key=lambda item: item[0])]


def named_tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False)]


def model_signature(model: Any) -> int:
    """A 60-bit digest of the model's tensors' names, shapes and dtypes."""
    text = "\n".join(f"{name} {tuple(t.shape)} {t.dtype}"
                     for name, t in sorted(named_tensors(model), key=lambda item: item[0]))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def model_skeleton(model_dir: Path, trust_remote_code: bool, dtype: Any) -> Any:
    """The model as ``load_model`` builds it, with every parameter on the meta device and no
    byte of the weights read. ``dtype``: what rank 0 loads in (None: the checkpoint's own)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or declared or torch.float32,
            trust_remote_code=trust_remote_code)
    model.config.name_or_path = str(model_dir)
    return model.eval()
