"""What requant knows about quantization schemes and presets, as data (one table each).

A scheme is what a checkpoint's ``quantization_config`` must declare (verification reads it),
and where vLLM has kernels for it (preflight reads it, before any work). A preset is a named
llm-compressor recipe of one scheme, written as the recipe YAML a user would write, with the
values a setting chooses named by that setting (``Setting("ignore")``). A new scheme or preset
is a row here; no code elsewhere names one.

Below the stages (settings, preflight, quantization and the card read it), and imports nothing
of requant's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint quantized with a recipe's ``scheme: <name>`` declares."""

    name: str
    weights: tuple[str, int]  # (type, bits)
    activations: tuple[str, int, bool, str]  # (type, bits, dynamic, strategy)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("W8A8", ("int", 8), ("int", 8, True, "token")),
    Scheme("FP8_DYNAMIC", ("float", 8), ("float", 8, True, "token")),
)}


@dataclass(frozen=True)
class Kernels:
    """Where vLLM serves a family of schemes (the names that start with ``prefixes``)."""

    family: str
    prefixes: tuple[str, ...]
    cpu: bool  # vLLM's CPU backend
    capability: tuple[tuple[int, int], tuple[int, int] | None]  # NVIDIA [min, max)
    fix: str  # the setting that avoids the family where it has no kernels


KERNELS: tuple[Kernels, ...] = (
    Kernels("INT8 W8A8", ("W8A8", "INT8"), cpu=True, capability=((7, 5), (10, 0)),
            fix="Set quantization.preset=fp8-dynamic for this GPU."),
    Kernels("FP8 W8A8", ("FP8",), cpu=False, capability=((8, 9), None),
            fix="Set quantization.preset=w8a8-int8, or run on such a GPU."),
)


def kernels_for(scheme: str | None) -> Kernels | None:
    """The kernel family of a recipe's scheme name; None where the table has no rule."""
    name = (scheme or "").upper()
    return next((k for k in KERNELS if name.startswith(k.prefixes)), None) if name else None


@dataclass(frozen=True)
class Setting:
    """In a preset: the value of ``quantization.<name>``."""

    name: str


@dataclass(frozen=True)
class Preset:
    name: str
    scheme: str
    summary: str  # for the settings' description
    modifiers: dict[str, dict[str, Any]]  # llm-compressor's quant_modifiers


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("w8a8-int8", "W8A8",
           "SmoothQuant + GPTQ, INT8 weights and dynamic per-token INT8 activations",
           {"SmoothQuantModifier": {"smoothing_strength": Setting("smoothing_strength")},
            "GPTQModifier": {"targets": ["Linear"], "scheme": "W8A8",
                             "ignore": Setting("ignore"),
                             "dampening_frac": Setting("dampening_frac")}}),
    Preset("fp8-dynamic", "FP8_DYNAMIC",
           "FP8 weights and dynamic FP8 activations, data-free, for GPUs of compute capability "
           ">= 10.0 where vLLM has no INT8 kernels",
           {"QuantizationModifier": {"targets": ["Linear"], "scheme": "FP8_DYNAMIC",
                                     "ignore": Setting("ignore")}}),
)}


def render_preset(name: str, settings: Any) -> dict[str, Any]:
    """The preset's recipe with each ``Setting`` replaced by that quantization setting."""

    def fill(value: Any) -> Any:
        if isinstance(value, Setting):
            found = getattr(settings, value.name)
            return list(found) if isinstance(found, list | tuple) else found
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):  # a copy: the table is never handed out to be changed
            return [fill(v) for v in value]
        return value

    return {"quant_stage": {"quant_modifiers": fill(PRESETS[name].modifiers)}}
