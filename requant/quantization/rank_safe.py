"""Two small modifiers that make llm-compressor's data-parallel calibration exact and repeatable
when the ranks share one copy of the weights.

1. SmoothQuant that smooths each weight exactly once when calibration runs on several ranks.

Found by requant's exactness check on two gloo ranks (tests/test_distributed_quantization.py),
with llm-compressor 0.14.0.1 / compressed-tensors 0.19.0: in a distributed run, weights offloaded
to CPU (or disk) live in memory *shared* by all ranks (``DistributedCPUCache``), yet every rank
applies SmoothQuant's update ``w <- w * s`` (and ``norm <- norm / s``). Whether a shared tensor
ends up scaled once or twice depends on which rank reads it first, so the norm and its Linears
can disagree: the model changes (measured: relative change up to 0.82 in one decoder layer), or
is consistently scaled by s^2 (an unasked-for migration strength).

This modifier keeps llm-compressor's own statistics merge (all-reduce of per-channel min/max)
and its own smoothing code; it only decides *who* writes: with shared storage, the source rank
writes once and the others wait at a barrier; with per-rank replicas (weights on each GPU,
``DistributedDeviceCache``) or one process, every rank writes its own copy, as upstream does.
Nothing in llm-compressor is patched; the recipe's ``SmoothQuantModifier`` arguments are passed
through unchanged.

2. A barrier at the end of each layer, after GPTQ (``run_with_barriers``). Each Linear is
solved by one rank, which writes its INT8 weights into the shared copy; nothing makes the other
ranks wait for that write before they run the same layer again to propagate activations to the
next one (upstream broadcasts, and so synchronizes, only modules that execute off the CPU).
Measured on two gloo ranks without it: layer 0 identical across two runs, every Linear of layer
1 different (about 1 % of codes, up to 4 steps): the next layer had calibrated on a mix of
quantized and unquantized outputs. With it, repeated runs are bit-identical.
"""

from __future__ import annotations

from typing import Any

from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier


def shared_storage(module: Any) -> bool:
    """Whether this module's offloaded weights are one copy shared by every rank."""
    from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))


class RankSafeSmoothQuantModifier(SmoothQuantModifier):
    """``SmoothQuantModifier`` whose update is applied once per copy of the weights."""

    def _apply_smoothing(self, model: Any) -> None:
        import torch.distributed as dist
        from compressed_tensors.distributed import is_distributed, is_source_process
        from compressed_tensors.offload.utils import as_single_threaded

        pending = [m for m in self.resolved_mappings_ if m.smooth_name in self.scales_]
        if not is_distributed() or not any(shared_storage(m.smooth_layer) for m in pending):
            super()._apply_smoothing(model)
            return
        self._reduce_activation_scales()  # every rank: the merged statistics
        if is_source_process():
            with as_single_threaded():  # no second merge; writes go to the shared storage
                super()._apply_smoothing(model)
        else:
            for mapping in pending:  # what the source rank's call consumes
                self.scales_.pop(mapping.smooth_name, None)
        dist.barrier()


def smooth_modifiers(smooth_text: str) -> list[RankSafeSmoothQuantModifier]:
    """The recipe's SmoothQuantModifier stage (``split_recipe``'s first part) as modifiers."""
    import yaml

    stage = yaml.safe_load(smooth_text)["smooth_stage"]["smooth_modifiers"]
    return [RankSafeSmoothQuantModifier(**(stage["SmoothQuantModifier"] or {}))]


class RankBarrierModifier(Modifier):
    """Listed after GPTQ: every rank waits until every layer's weights are written."""

    def on_initialize(self, state: Any, **kwargs: Any) -> bool:
        return True

    def on_sequential_epoch_end(self, state: Any, event: Any, modules: Any = None,
                                **kwargs: Any) -> None:
        from compressed_tensors.distributed import is_distributed

        if is_distributed():
            import torch.distributed as dist

            dist.barrier()


def run_with_barriers(oneshot: Any, recipe_text: str, **kwargs: Any) -> None:
    """Run the recipe's modifiers one oneshot call each, each data-driven one in one sequential
    pipeline with the barrier after it. (Within one call, llm-compressor gives every modifier
    its own calibration pass, so a modifier listed beside GPTQ would never see GPTQ's layers.)"""
    from llmcompressor.recipe import Recipe

    for modifier in Recipe.create_instance(path_or_modifiers=recipe_text).modifiers:
        if modifier.requires_calibration_data:
            oneshot(recipe=[modifier, RankBarrierModifier()], pipeline="sequential", **kwargs)
        else:
            oneshot(recipe=[modifier], **kwargs)
