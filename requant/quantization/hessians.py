"""What one calibration forward of a decoder layer records for SmoothQuant and GPTQ together.

Two facts make one pass enough (docs/quantization.md, "One calibration pass"):
- Linears that read the same tensor (q/k/v read the attention norm's output, gate/up the MLP
  norm's) have the same GPTQ Hessian 2·XᵀX/n, so it is accumulated once per input, not per Linear.
- SmoothQuant divides that input by per-channel scales s, so the Hessian of the smoothed input is
  S⁻¹ H S⁻¹ of the one accumulated before smoothing: no second pass to see smoothed activations.
Both sums are plain ``addmm`` into fp32 (TF32 on tensor cores when allowed: bf16 activations
have 8 significant bits, TF32 keeps 10, so the products are exact and only the fp32 sums round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SharedHessians:
    """GPTQ Hessians of one decoder layer, one per distinct input tensor.

    Which Linears share an input is seen, not assumed: during the first batch every Linear's
    input tensor is kept, and a Linear whose input *is* (same object) an earlier one's joins
    that owner. Keeping the tensors alive for that batch stops Python from reusing an id.
    """

    modules: list[Any]  # quantized Linears of the layer, in forward order once seen
    owner: dict[Any, Any] = field(default_factory=dict)  # module -> module accumulating for it
    sums: dict[Any, Any] = field(default_factory=dict)  # owner -> Σ XᵀX (fp32)
    samples: int = 0  # calibration samples seen (GPTQ normalizes per sample, as llm-compressor)
    _first: list[tuple[Any, Any]] = field(default_factory=list)

    def add(self, module: Any, inp: Any) -> None:
        import torch

        if module not in self.owner:
            self.owner[module] = next((m for m, seen in self._first if seen is inp), module)
            self._first.append((module, inp))
        if self.owner[module] is not module:
            return
        x = inp.reshape(-1, inp.shape[-1])
        if module not in self.sums:
            self.sums[module] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32,
                                            device=x.device)
        add_gram(self.sums[module], x)

    def end_of_first_batch(self) -> None:
        self._first.clear()

    def groups(self) -> list[tuple[Any, list[Any]]]:
        """(owner, Linears sharing its Hessian), in forward order."""
        out: dict[Any, list[Any]] = {}
        for module in self.owner:
            out.setdefault(self.owner[module], []).append(module)
        return list(out.items())

    def normalized(self, owner: Any) -> Any:
        """2·ΣXᵀX / samples: llm-compressor's normalization, so GPTQ's losses compare."""
        return self.sums.pop(owner).mul_(2.0 / max(self.samples, 1))

    def smooth_input(self, module: Any, scales: Any) -> None:
        """The input of ``module`` was divided by ``scales``: H' = S⁻¹ H S⁻¹."""
        import torch

        inv = 1.0 / scales.to(device=self.sums[self.owner[module]].device, dtype=torch.float32)
        self.sums[self.owner[module]].mul_(inv.view(-1, 1)).mul_(inv.view(1, -1))


def add_gram(total: Any, x: Any) -> None:
    """total += XᵀX in fp32. On a GPU, 16-bit X goes to the tensor cores as it is, with fp32
    output (``out_dtype``): its products are exact in fp32 either way, and this runs at the
    16-bit rate, about twice TF32's. Elsewhere (CPU, fp32 models, a torch without it): X in
    fp32, ``addmm_``."""
    import torch

    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE.get("ok", True):
        try:
            total.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
            _MM_OUT_DTYPE["ok"] = True
            return
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE["ok"] = False
    xf = x.to(torch.float32)
    total.addmm_(xf.t(), xf)


_MM_OUT_DTYPE: dict[str, bool] = {}


@dataclass
class ChannelRange:
    """Per-channel min and max of a norm's output, SmoothQuant's statistic (llm-compressor's
    dynamic range max - min, kept in the activations' dtype as it does)."""

    low: Any = None
    high: Any = None

    def add(self, out: Any) -> None:
        import torch

        flat = out.reshape(-1, out.shape[-1])
        lo, hi = flat.min(dim=0).values, flat.max(dim=0).values
        self.low = lo if self.low is None else torch.minimum(self.low, lo)
        self.high = hi if self.high is None else torch.maximum(self.high, hi)

    def dynamic_range(self) -> Any:
        return self.high - self.low


#: llm-compressor's floor for smoothing scales (MINIMUM_SMOOTHING_SCALE).
MIN_SCALE = 1e-5


def smoothing_scales(act_range: Any, balance: list[Any], strength: float) -> Any:
    """s_j = range_j^a / (2·max_i |W_ij|)^(1-a) (a: the strength), as llm-compressor's
    SmoothQuantModifier computes it (same dtype, same floor): the scales it would pick."""
    import torch

    weight = torch.cat([m.weight.abs().max(dim=0, keepdim=True)[0] for m in balance], dim=0)
    weight = 2.0 * weight.max(dim=0)[0]
    scales = act_range.pow(strength) / weight.pow(1 - strength)
    scales = torch.where(weight > 0.0, scales, act_range)
    return torch.maximum(scales, torch.tensor([MIN_SCALE], device=scales.device))


def apply_smoothing(norm: Any, balance: list[Any], scales: Any) -> None:
    """Norm output / s, Linear weights · s: the same function (checked after). Computed in
    the scales' dtype and stored in the weights' own, as llm-compressor's update does."""
    for module in balance:
        _store(module, "weight", module.weight * scales.view(1, -1))
    _store(norm, "weight", norm.weight / (scales if norm.weight.ndim == 1 else scales.view(-1, 1)))
    if getattr(norm, "bias", None) is not None:
        _store(norm, "bias", norm.bias / scales)


def _store(module: Any, name: str, value: Any) -> None:
    param = getattr(module, name)
    param.data = value.to(param.dtype)


def gptq_group(modules: list[Any], hessian: Any, block_size: int, dampening: float) -> float:
    """GPTQ on Linears sharing one Hessian, solved once: with per-row scales (channel or group
    strategy) rows are independent given H, so stacking the Linears' rows is the same solve as
    one call each, with one factorization instead of several. Returns GPTQ's summed loss."""
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.quantization.calibration import observe

    args = modules[0].quantization_scheme.weights
    observe(modules, base_name="weight")
    qparams = [m.weight_observer.get_qparams() for m in modules]
    rows = [m.weight.shape[0] for m in modules]
    weights = torch.cat([m.weight.detach() for m in modules]).to(torch.float32)[None]
    scale = torch.cat([q["scale"] for q in qparams])[None]
    zero = torch.cat([q["zero_point"] for q in qparams])[None]
    quantized, losses, _fallback = quantize_weight(
        weights, hessian[None], scale, zero, None, args, blocksize=block_size,
        percdamp=dampening)
    for module, q, s, z in zip(modules, quantized[0].split(rows), scale[0].split(rows),
                               zero[0].split(rows), strict=True):
        module.weight.data = q.to(module.weight.dtype)
        module.weight_scale.data = s.to(module.weight.dtype).reshape(module.weight_scale.shape)
        module.weight_zero_point.data = z.to(args.zp_dtype).reshape(
            module.weight_zero_point.shape)
    return float(losses.sum())
