"""SmoothQuant that is exact for every architecture requant accepts, and proven so on each run.

SmoothQuant divides a norm's output by per-channel scales s and multiplies the weights of the
Linears that read it by s: the same function, with activations easier to quantize. That holds
only if (1) the norm feeds exactly those Linears and (2) dividing the norm's weight by s divides
its output by s. llm-compressor picks (norm -> Linears) pairs by architecture name and divides
``weight``; for Gemma 2/3 both conditions fail (``post_attention_layernorm`` feeds the residual,
not the MLP, and the norm computes ``x̂ · (1 + w)``), which silently changes the model.

So requant (1) names the mappings itself, per ``model_type``, in the recipe it records; (2) for
offset norms (``x̂ · (1 + w)``) swaps in a plain norm with weight ``1 + w`` while SmoothQuant runs
and swaps back with ``w = weight - 1`` (the same computation, so nothing else changes; no
llm-compressor code is touched); and (3) checks after smoothing, before GPTQ, that every decoder
layer computes what it did before on a few calibration samples, naming the mapping at fault if
not (``check_smoothing``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import yaml

from requant.errors import SettingsError, SmoothingNotExact
from requant.hashing import fingerprint
from requant.quantization.recipes import ResolvedRecipe, modifiers

QKV = ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
GATE_UP = ["re:.*gate_proj$", "re:.*up_proj$"]


@dataclass(frozen=True)
class Architecture:
    mappings: list[list[Any]]  # [[balance Linear patterns], norm pattern], llm-compressor's form
    offset_norm: bool = False  # the norm computes x̂ · (1 + w)


_STANDARD = Architecture([[QKV, "re:.*input_layernorm$"],
                          [GATE_UP, "re:.*post_attention_layernorm$"]])
_GEMMA = Architecture([[QKV, "re:.*input_layernorm$"],
                       [GATE_UP, "re:.*pre_feedforward_layernorm$"]], offset_norm=True)

#: model_type -> mappings that pass the exactness check (docs/quantization.md, "Architectures").
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _STANDARD, "mistral": _STANDARD, "qwen2": _STANDARD, "qwen3": _STANDARD,
    "phi3": Architecture([[["re:.*qkv_proj$"], "re:.*input_layernorm$"],
                          [["re:.*gate_up_proj$"], "re:.*post_attention_layernorm$"]]),
    "gemma2": _GEMMA, "gemma3_text": _GEMMA,
}

MAPPINGS_HELP = (
    "write a recipe file (quantization.recipe) whose SmoothQuantModifier lists `mappings`: "
    "[[balance Linear patterns], norm pattern] pairs where each norm feeds exactly those "
    "Linears (see docs/quantization.md, Architectures), or use a recipe without "
    "SmoothQuantModifier (e.g. quantization.preset=fp8-dynamic)")


def fit_recipe(recipe_text: str, model_type: str) -> tuple[str, Architecture | None]:
    """The recipe with SmoothQuant's mappings named for this architecture; unchanged when it
    has no SmoothQuantModifier or lists its own mappings (the run's check then judges them)."""
    data = yaml.safe_load(recipe_text)
    smooth = [args for name, args in modifiers(data)
              if name == "SmoothQuantModifier" and isinstance(args, dict)]
    if not smooth:
        return recipe_text, None
    arch = ARCHITECTURES.get(model_type)
    missing = [args for args in smooth if not args.get("mappings")]
    if not missing:
        return recipe_text, arch
    if arch is None:
        raise SettingsError(
            f"quantization: SmoothQuant has no verified mapping for model_type {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}). To quantize it anyway, "
            + MAPPINGS_HELP + ".")
    for args in missing:
        args["mappings"] = [list(m) for m in arch.mappings]
    return yaml.safe_dump(data, sort_keys=False), arch


def split_recipe(recipe_text: str) -> tuple[str | None, str | None]:
    """(SmoothQuant alone, everything else): run apart so the model can be checked between."""
    data = yaml.safe_load(recipe_text)
    smooth: dict[str, Any] = {}
    rest = _without(data, smooth)
    smooth_text = yaml.safe_dump({"smooth_stage": {"smooth_modifiers": smooth}}, sort_keys=False) \
        if smooth else None
    rest_text = yaml.safe_dump(rest, sort_keys=False) if modifiers(rest) else None
    return smooth_text, rest_text


def _without(node: Any, taken: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "SmoothQuantModifier":
                taken[key] = value
            else:
                out[key] = _without(value, taken)
        return out
    if isinstance(node, list):
        return [_without(item, taken) for item in node]
    return node


# ---- offset norms: x̂ · (1 + w) ----------------------------------------------------------------


def _plain_norm_class():
    import torch

    class PlainRMSNorm(torch.nn.Module):
        """x̂ · w in fp32 with w = 1 + w_offset: exactly what the offset norm computes."""

        def __init__(self, norm: torch.nn.Module) -> None:
            super().__init__()
            self.eps = norm.eps
            self.weight = torch.nn.Parameter(1.0 + norm.weight.detach().float())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * self.weight.float()).type_as(x)

    return PlainRMSNorm


@contextlib.contextmanager
def plain_norms(model: Any, arch: Architecture | None) -> Iterator[None]:
    """While SmoothQuant runs, the mapped offset norms are plain norms computing the same."""
    if arch is None or not arch.offset_norm:
        yield
        return
    plain_cls = _plain_norm_class()
    patterns = [re.compile(norm.removeprefix("re:")) for _, norm in arch.mappings]
    swapped = []
    for name, module in list(model.named_modules()):
        if any(p.fullmatch(name) for p in patterns):
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, plain_cls(module))
            swapped.append((holder, child, module))
    try:
        yield
    finally:
        for holder, child, original in swapped:
            plain = getattr(holder, child)
            original.weight.data = (plain.weight.detach().float() - 1.0).to(
                device=original.weight.device, dtype=original.weight.dtype)
            setattr(holder, child, original)


# ---- the check -----------------------------------------------------------------------------


#: Unit roundoff of the dtypes models are stored in: smoothing re-rounds every weight it scales.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def tolerances(dtype: str, override: float | None = None) -> tuple[float, float]:
    """(first-layer Linear outputs, each decoder layer's update): relative changes that the
    re-rounding of smoothed weights alone explains.

    Smoothing re-rounds the norm's and the Linears' weights once, so a correct mapping moves a
    first-layer Linear's output by about one unit roundoff u (SmolLM2-135M, bf16: 0.9-1.6 u; an
    8B-shaped model: 0.9-2.3 u; Gemma, where (1 + w)/s - 1 is re-rounded: 3.1 u): 8 u bounds
    it. Each layer's update (output - input, on the inputs it saw before smoothing) passes
    through a few such Linears: 16 u. Both are per layer, so they hold at any depth (the logits
    do not: 0.026 after SmolLM2's 30 layers, 0.083 after the 8B shape's 32 from rounding alone;
    they are recorded, not gated). A wrong mapping moves them by ~1. fp32 gets floors (1e-5,
    1e-4): its accumulation, not its storage, dominates there. docs/quantization.md has the
    measurements.
    """
    if override is not None:  # an operator's justified bound, for both
        return override, override
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-8)
    return max(8 * u, 1e-5), max(16 * u, 1e-4)


@dataclass(frozen=True)
class SmoothingCheck:
    logits_rel_change: float  # recorded: grows with depth from rounding alone
    layer_changes: list[float]  # each decoder layer's update, relative change
    layer_tolerance: float
    per_mapping: dict[str, float]  # balance Linears of the first decoder layer: rel. change
    linear_tolerance: float
    tokens: int

    def as_record(self) -> dict[str, Any]:
        return {"logits_rel_change": self.logits_rel_change,
                "max_layer_update_rel_change": max(self.layer_changes, default=0.0),
                "layer_update_rel_change": self.layer_changes,
                "layer_tolerance": self.layer_tolerance,
                "first_layer_balance_rel_change": self.per_mapping,
                "first_layer_tolerance": self.linear_tolerance, "tokens": self.tokens}


def layer_list(model: Any) -> Any:
    """The ModuleList of decoder layers: the longest in the model (``model.layers``), or None."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else None


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers (``layer_list``), as a list."""
    return list(layer_list(model) or [])


def probe(model: Any, input_ids: list[list[int]], balance: list[str],
          record_layers: bool = False) -> dict[str, Any]:
    """Logits and the first decoder layer's balance-Linear outputs on a few samples; with
    ``record_layers`` (the reference, before smoothing) also every decoder layer's inputs and
    output, which ``layer_changes`` replays on the smoothed model."""
    import torch

    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in balance}
    calls: list[list[Any]] = [[] for _ in decoder_layers(model)]
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: outputs[name].append(out.detach().float().cpu()))
        for name in balance]
    hooks += [layer.register_forward_hook(
        lambda _m, args, kwargs, out, i=i: calls[i].append((args, kwargs, _hidden(out))),
        with_kwargs=True) for i, layer in enumerate(decoder_layers(model)) if record_layers]
    logits = []
    try:
        with torch.no_grad():
            for ids in input_ids:
                device = next(model.parameters()).device
                out = model(torch.tensor([ids], device=device), use_cache=False)
                logits.append(out.logits.detach().float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return {"logits": torch.cat(logits, dim=1), "layers": calls,
            "balance": {n: torch.cat(v, dim=1) for n, v in outputs.items()}}


def _hidden(out: Any) -> Any:
    return (out[0] if isinstance(out, tuple) else out).detach()


def layer_changes(model: Any, before: dict[str, Any]) -> list[float]:
    """Per decoder layer, on the inputs it saw before smoothing: the relative change of what it
    adds to the residual stream (output - input). Independent of depth: rounding does not pile
    up across layers here, as it does in the logits."""
    import torch

    changes = []
    with torch.no_grad():
        for layer, calls in zip(decoder_layers(model), before["layers"], strict=True):
            worst = 0.0
            for args, kwargs, out_before in calls:
                hidden_in = (args[0] if args else kwargs["hidden_states"]).float()
                out_after = _hidden(layer(*args, **kwargs)).float()
                worst = max(worst, rel_change(out_before.float() - hidden_in,
                                              out_after.to(hidden_in.device) - hidden_in))
            changes.append(worst)
    return changes


def first_layer_balance(model: Any, mappings: list[list[Any]]) -> dict[str, list[str]]:
    """Mapping label -> the Linears of the first decoder layer it balances."""
    names = [name for name, _ in model.named_modules()]
    first = next((re.match(r"(.*\.layers\.0)\.", n).group(1) for n in names
                  if re.match(r".*\.layers\.0\.", n)), None)
    out = {}
    for balance, norm in mappings:
        pats = [re.compile(p.removeprefix("re:")) for p in balance]
        label = f"{norm.removeprefix('re:')} -> {[p.removeprefix('re:') for p in balance]}"
        out[label] = [n for n in names if first and n.startswith(first + ".")
                      and any(p.fullmatch(n) for p in pats)]
    return out


def rel_change(before: Any, after: Any) -> float:
    return float((after - before).norm() / before.norm().clamp_min(1e-30))


def check_smoothing(model: Any, before: dict[str, Any], after: dict[str, Any],
                    groups: dict[str, list[str]], tolerance: tuple[float, float],
                    model_type: str) -> SmoothingCheck:
    """Fail unless the first layer's balanced Linears and every decoder layer compute what they
    did, up to rounding: the first names a mapping whose Linears do not read its norm (or whose
    norm is not x̂ · w), the second catches a norm that also feeds Linears left out of it."""
    per_mapping = {label: max((rel_change(before["balance"][n], after["balance"][n])
                               for n in names), default=0.0)
                   for label, names in groups.items()}
    check = SmoothingCheck(rel_change(before["logits"], after["logits"]),
                           layer_changes(model, before), tolerance[1], per_mapping, tolerance[0],
                           int(before["logits"].shape[1]))
    at_fault = [label for label, value in per_mapping.items() if value > tolerance[0]]
    bad_layers = [i for i, c in enumerate(check.layer_changes) if c > tolerance[1]]
    if at_fault or bad_layers:
        fault = ("Mapping at fault: " + "; ".join(at_fault) + " (its Linears' outputs in the "
                 "first layer changed; a correct mapping leaves them equal)") if at_fault else (
                 "Every mapped Linear is unchanged, so a norm also feeds Linears its mapping "
                 "leaves out")
        worst = max(check.layer_changes, default=0.0)
        raise SmoothingNotExact(
            f"SmoothQuant changed the model ({model_type}): decoder layers {bad_layers[:8]} "
            f"compute something else (relative change up to {worst:.3g}; rounding allows "
            f"{tolerance[1]:.3g}). {fault}. Nothing was written. Fix: {MAPPINGS_HELP}.",
            check.as_record())
    return check


def fit_to_model(recipe: ResolvedRecipe, model_type: str) -> ResolvedRecipe:
    """The recipe as it will run on this architecture: SmoothQuant's mappings spelled out (so
    ``recipe.yaml`` and the candidate key record them), or a SettingsError for an architecture
    without verified mappings, before any calibration."""
    text, _ = fit_recipe(recipe.text, model_type)
    if text == recipe.text:
        return recipe
    return replace(recipe, text=text, sha256=fingerprint(yaml.safe_load(text)))
