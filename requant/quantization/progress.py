"""Layer-by-layer progress of llm-compressor's sequential calibration, from plain PyTorch hooks.

The sequential pipeline runs each decoder layer over every sample twice per calibration pass
(calibrate with the modifiers' hooks, then propagate to the next layer), one pass per data-driven
modifier (SmoothQuant's, then GPTQ's). A forward pre-hook on each decoder layer counts those
calls, which says which pass and which layer is running and how far the whole job is, without
touching llm-compressor: its own hooks and outputs are unchanged (the hook returns nothing).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requant.progress import Report, eta_text

#: Forward calls per layer per sample in one pass: calibration, then propagation.
CALLS_PER_SAMPLE = 2
_MODIFIER = re.compile(r"\b(SmoothQuantModifier|GPTQModifier|AWQModifier|AutoRoundModifier)\b")


def calibration_passes(recipe_text: str) -> int:
    """One sequential pass per data-driven modifier in the recipe (at least one)."""
    return max(1, len(_MODIFIER.findall(recipe_text)))


def decoder_layers(model: Any) -> list[Any]:
    """The modules the sequential pipeline treats as layers (the model's no-split classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def layer_progress(model: Any, samples: int, passes: int, report: Report) -> Iterator[None]:
    layers = decoder_layers(model)
    if not layers or samples <= 0:
        yield
        return
    total = passes * len(layers) * CALLS_PER_SAMPLE * samples
    seen = {"calls": 0, "pass": 1, "last_layer": -1}
    started = time.monotonic()

    def hook(index: int) -> Any:
        def count(module: Any, args: Any) -> None:
            if index < seen["last_layer"]:
                seen["pass"] += 1
            seen["last_layer"] = index
            seen["calls"] += 1
            fraction = min(seen["calls"] / total, 0.99)
            report(fraction, f"calibration pass {min(seen['pass'], passes)} of {passes}, "
                   f"layer {index + 1} of {len(layers)}, {eta_text(started, fraction)}")
        return count

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
