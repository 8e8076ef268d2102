"""SmoothQuant + GPTQ in one calibration pass, layer by layer, on llm-compressor's own parts.

llm-compressor 0.14 gives each data-driven modifier its own sequential pass, and each pass runs
every decoder layer twice per sample (calibrate, propagate): four forwards of the model per
sample. Here each layer runs once to calibrate and once to propagate, for both modifiers:

1. one forward of the layer over every batch records the norms' channel ranges (SmoothQuant's
   statistic) and one Hessian per distinct Linear input (``requant.quantization.hessians``);
2. SmoothQuant's scales are computed and applied as llm-compressor computes them, and the
   Hessians of the smoothed inputs follow exactly (S⁻¹ H S⁻¹);
3. the layer is checked to compute what it did before smoothing (the exactness check of
   ``requant.quantization.smoothing``, here on every layer as it goes);
4. llm-compressor's ``quantize_weight`` (GPTQ) solves each Hessian group once, with the scheme
   its ``GPTQModifier`` resolves and the weight observers it attaches;
5. a second forward with the quantized weights makes the next layer's inputs.

SmoothQuant's statistics therefore see the activations of the model as quantized so far (today's
two-pass order saw the unquantized model's); docs/quantization.md measures that the result is
at least as good. Batches of equal-length samples run together (``batch_tokens``). Recipes this
does not cover (other modifiers, static activations, tensor-wise weight scales) run through
``oneshot`` as before: ``plan`` says which.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import yaml

from requant.errors import QuantizationFailed, SmoothingNotExact
from requant.progress import Report, eta_text, no_progress
from requant.quantization.hessians import (
    ChannelRange,
    SharedHessians,
    apply_smoothing,
    gptq_group,
    smoothing_scales,
)
from requant.quantization.ranks import SINGLE, Ranks, solve_cost
from requant.quantization.recipes import modifiers
from requant.quantization.resume import LayerStore
from requant.quantization.smoothing import (
    ARCHITECTURES,
    MAPPINGS_HELP,
    Architecture,
    decoder_layers,
    layer_list,
    plain_norms,
    rel_change,
    tolerances,
)
from requant.quantization.weights_home import WeightsHome

#: Tokens per calibration forward: large enough to keep a GPU's matmuls busy.
BATCH_TOKENS = 16384
_GPTQ_KEYS = {"targets", "scheme", "ignore", "dampening_frac", "block_size", "actorder"}
_SMOOTH_KEYS = {"smoothing_strength", "mappings"}


@dataclass(frozen=True)
class SinglePassPlan:
    strength: float | None  # SmoothQuant's alpha; None: GPTQ alone
    mappings: list[list[Any]]  # [[balance patterns], norm pattern]
    gptq: dict[str, Any]  # GPTQModifier's arguments


def plan(recipe_text: str) -> SinglePassPlan | None:
    """The single-pass form of a recipe, or None when it holds anything else (then ``oneshot``
    runs it): at most one SmoothQuantModifier with named mappings, then one GPTQModifier on
    Linears whose weights have per-channel or per-group scales and whose activations, if
    quantized, are dynamic."""
    found = modifiers(yaml.safe_load(recipe_text))
    names = [name for name, _ in found]
    if names not in (["GPTQModifier"], ["SmoothQuantModifier", "GPTQModifier"]):
        return None
    args = {name: value or {} for name, value in found}
    gptq, smooth = args["GPTQModifier"], args.get("SmoothQuantModifier")
    if set(gptq) - _GPTQ_KEYS or not isinstance(gptq.get("scheme"), str) or \
            gptq.get("targets", ["Linear"]) not in (["Linear"], "Linear"):
        return None
    if smooth is not None and (set(smooth) - _SMOOTH_KEYS or not smooth.get("mappings")):
        return None
    if not _scheme_fits(gptq):
        return None
    return SinglePassPlan(smooth.get("smoothing_strength", 0.5) if smooth else None,
                          smooth["mappings"] if smooth else [], gptq)


def outside_layers(model: Any, gptq_args: dict[str, Any]) -> list[str]:
    """Linears the recipe quantizes outside the decoder layers (``lm_head`` when the ignore
    list leaves it in). The single pass calibrates decoder layers only: it must not take such a
    recipe, or those Linears keep the scales quantization was initialised with, which are
    uninitialised memory (zeros and NaN, or finite garbage that passes a reload check)."""
    from compressed_tensors.utils.match import match_named_modules
    from llmcompressor.modifiers.gptq import GPTQModifier

    config = GPTQModifier(**gptq_args).resolve_quantization_config()
    targets = sorted({t for scheme in config.config_groups.values() for t in scheme.targets})
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    return [name for name, module in match_named_modules(model, targets, config.ignore)
            if id(module) not in inside]


def weights_read_once(skeleton: Any, recipe_text: str) -> bool:
    """Whether ranks running this recipe share rank 0's weights: only when the single pass runs
    it (it declines a recipe quantizing Linears outside the decoder layers, and then every rank
    reads the model). Decided from the model's skeleton (``weights_home.model_skeleton``), before
    any rank reads a byte: the same answer on every rank and in the memory plan."""
    the_plan = plan(recipe_text)
    return the_plan is not None and not outside_layers(skeleton, the_plan.gptq)


def _scheme_fits(gptq_args: dict[str, Any]) -> bool:
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.modifiers.gptq import GPTQModifier

    config = GPTQModifier(**gptq_args).resolve_quantization_config()
    for scheme in config.config_groups.values():
        weights, acts = scheme.weights, scheme.input_activations
        if weights is None or scheme.output_activations is not None:
            return False
        if weights.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
            return False
        if acts is not None and not acts.dynamic:
            return False
    return True


def quantize_single_pass(model: Any, the_plan: SinglePassPlan, dataset: Any, device: str,
                         cache_device: str, *, tolerance: float | None = None,
                         batch_tokens: int = BATCH_TOKENS, store: LayerStore | None = None,
                         ranks: Ranks = SINGLE, shared_weights: bool = False,
                         report: Report = no_progress) -> dict[str, Any]:
    """Quantize ``model`` (on the host) in place, one decoder layer at a time on ``device``;
    returns the smoothing check's record and GPTQ's summed loss, for the manifest. With a
    ``store``, each finished layer is kept there, and the layers it already holds are read back
    instead of calibrated (``resume_point``). With several ``ranks``, ``dataset`` is this
    rank's shard and the layer's statistics and solves are shared (``requant.quantization.
    ranks``); every rank ends with the same model. ``shared_weights``: ranks other than 0 hold
    the model's skeleton and receive each module from rank 0 (``weights_home``)."""
    import torch
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )
    from llmcompressor.utils.helpers import DisableQuantization

    gptq, arch, check = _start(model, the_plan, tolerance)
    home = WeightsHome(ranks, device, shared_weights)
    home.check_same_model(model)
    started, loss, phases = time.monotonic(), 0.0, Phases(device)
    with torch.no_grad(), DisableQuantization(model), plain_norms(model, arch):
        with phases("layer inputs"):
            batches = layer_inputs(model, dataset, home, cache_device, batch_tokens)
        layers = decoder_layers(model)
        names = {m: name for name, m in model.named_modules()}
        done, start = resume_point(store, ranks, home, batches, len(layers), cache_device,
                                   phases, report)
        keeper = _keeper(store, ranks, batches)
        for index, layer in enumerate(layers):
            if index < start:  # before the kept inputs: only its stored state is needed
                loss += skip_layer(layer, index, store, done[index], check, phases)
                continue
            resumed = index < len(done)
            _to_device(layer, index, home, store if resumed else None, phases)
            layer_loss = resume_layer(layer, index, batches, done[index], check, phases) \
                if resumed else calibrate_layer(
                    layer, index, batches, layer_mappings(layer, names[layer], the_plan.mappings)
                    if the_plan.strength is not None else [], the_plan.strength or 0.0, gptq,
                    check, phases, ranks)
            loss += layer_loss
            with phases("layer back to host"):
                home.to_host(layer)
            if keeper is not None and not resumed:
                keep_layer(keeper, index, layer, layer_loss, check, batches, len(layers),
                           ranks, phases)
            _progress(report, index, len(layers), len(done), started)
        if keeper is not None:
            with phases("layer kept for resuming (the previous write's wait)"):
                keeper.wait()
    gptq.end_calibration(model)
    modify_save_pretrained(model)  # saves compressed, as oneshot leaves a model
    return {"smoothing_check": check.record() if the_plan.strength is not None else None,
            "gptq_loss": round(loss, 4), "pipeline": "single-pass",
            "batches": len(batches), "phases_s": phases.record(),
            "resumed_at_layer": len(done) if store is not None else None,
            "resumed_inputs_at_layer": start if store is not None else None}


def _keeper(store: LayerStore | None, ranks: Ranks, batches: list[list[Any]]
            ) -> LayerStore | None:
    """Rank 0's store (the one copy of what every rank holds), its kept inputs' host buffers
    being pinned from now on (one process only: each rank's inputs are its own shard)."""
    if store is None or ranks.rank != 0:
        return None
    if ranks.world == 1:
        store.prepare_inputs([batch[0] for batch in batches])
    return store


def _progress(report: Report, index: int, layers: int, resumed: int, started: float) -> None:
    fraction = (index + 1) / layers
    report(min(fraction, 0.99), f"calibrated layer {index + 1} of {layers}"
           f"{f' (resumed at layer {resumed + 1})' if resumed else ''}, "
           f"{eta_text(started, fraction)}")


def _start(model: Any, the_plan: SinglePassPlan, tolerance: float | None
           ) -> tuple[Any, Architecture, LayerCheck]:
    """GPTQ's observers on the model, the architecture's smoothing map, the layer check."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    gptq = GPTQModifier(**the_plan.gptq)
    gptq.initialize_quantization(model)
    gptq.start_calibration(model)
    known = ARCHITECTURES.get(model.config.model_type)
    arch = Architecture(the_plan.mappings, offset_norm=bool(known and known.offset_norm))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.eval()
    return gptq, arch, LayerCheck(tolerances(dtype, tolerance), model.config.model_type)


def _to_device(layer: Any, index: int, home: WeightsHome, kept: LayerStore | None,
               phases: Phases) -> None:
    """The layer onto the device; its finished state read back from ``kept`` (resuming)."""
    with phases("layer to device"):
        home.to_device(layer)
    if kept is not None and home.holds_weights:
        with phases("layer read back"):
            kept.load(index, layer)
    if home.shared:
        with phases("layer shared from rank 0"):
            home.share(layer)


def resume_point(store: LayerStore | None, ranks: Ranks, home: WeightsHome,
                 batches: list[list[Any]], layers: int, cache_device: str, phases: Phases,
                 report: Report) -> tuple[list[dict[str, Any]], int]:
    """(the finished layers' records, the layer the pass starts computing from). With kept
    inputs (one process only: each rank's would be its own shard), the layers before them
    are only read back; the rest of the finished ones re-derive the next inputs. On ranks,
    every rank holds the same finished layer, so rank 0 alone keeps it (``requant.
    quantization.resume``), and all ranks resume from the count they all see, each then
    propagating its own shard through the stored layers, as the uninterrupted run did."""
    if store is None:
        return [], 0
    done = store.finished(layers, verify=home.holds_weights)
    done = done[:ranks.least(len(done))]  # the ranks' collectives must match one for one
    start = 0
    if done and ranks.world == 1:
        with phases("layer inputs read back"):
            start, hidden = store.kept_inputs(len(done), len(batches), cache_device)
        for batch, h in zip(batches, hidden, strict=False):
            batch[0] = h
    if done:
        report(0.0, f"resumed at layer {len(done) + 1} of {layers}: {len(done)} finished "
               f"layers read back from {store.folder}"
               + (f", their inputs from layer {start + 1} on" if start else ""))
    return done, start


def skip_layer(layer: Any, index: int, store: LayerStore | None, record: dict[str, Any],
               check: LayerCheck, phases: Phases) -> float:
    """A finished layer before the kept inputs: its stored state into the model (still on the
    host), its recorded check and loss; nothing runs on it."""
    assert store is not None
    with phases("layer read back"):
        store.load(index, layer)
    check.restore(index, record["check"])
    return float(record["gptq_loss"])


def keep_layer(keeper: LayerStore, index: int, layer: Any, layer_loss: float,
               check: LayerCheck, batches: list[list[Any]], layers: int, ranks: Ranks,
               phases: Phases) -> None:
    """The finished layer into the store, and every ``inputs_every`` layers the next one's
    inputs (one process only)."""
    with phases("layer kept for resuming (the previous write's wait)"):
        keeper.save(index, layer, {"gptq_loss": layer_loss,
                                   "check": check.layer_record(index)})
    if ranks.world == 1 and keeper.wants_inputs(index + 1, layers):
        with phases("layer inputs kept (the copy to the host)"):
            keeper.keep_inputs(index + 1, [batch[0] for batch in batches])


def resume_layer(layer: Any, index: int, batches: list[list[Any]], record: dict[str, Any],
                 check: LayerCheck, phases: Phases) -> float:
    """A finished layer read back (its stored state is in ``layer`` by now): its recorded
    check and loss, and the next layer's inputs made by running it exactly as the run that
    finished it did."""
    check.restore(index, record["check"])
    propagate(layer, index, batches, phases)
    return float(record["gptq_loss"])


def propagate(layer: Any, index: int, batches: list[list[Any]], phases: Phases) -> None:
    """The next layer's inputs: this layer, quantized, run over every batch."""
    with phases("propagate"):
        for batch in batches:
            batch[0] = run_layer(layer, index, batch).to(batch[0].device)


class _Caught(Exception):
    pass


def _stub_class():
    import torch

    class LayerStub(torch.nn.Module):
        """Stands in for a decoder layer while the model prepares its inputs: records what
        the model hands that layer (per layer: masks and position encodings may differ, e.g.
        Gemma's sliding-window layers) and passes the hidden states through; the last one
        stops the forward before the final norm and the head."""

        def __init__(self, layer: Any, calls: list[Any], last: bool) -> None:
            super().__init__()
            self.calls, self.last = calls, last
            if hasattr(layer, "attention_type"):
                self.attention_type = layer.attention_type

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.calls.append((args[1:], dict(kwargs, use_cache=False, past_key_values=None),
                               hidden))
            if self.last:
                raise _Caught
            return hidden

    return LayerStub


def layer_inputs(model: Any, dataset: Any, home: WeightsHome, cache_device: str,
                 batch_tokens: int) -> list[list[Any]]:
    """Per batch: [hidden states entering the first layer, each layer's other arguments], as
    the model hands them over. Everything but the decoder layers runs on ``home.device`` for
    it (on a rank that holds no weights, rank 0's, received)."""
    import torch

    holder = layer_list(model)
    layers = list(holder)
    calls: list[list[Any]] = [[] for _ in layers]
    stub = _stub_class()
    for i, layer in enumerate(layers):
        holder[i] = stub(layer, calls[i], last=i == len(layers) - 1)
    batches = []
    try:
        home.to_device(model)  # embeddings, position tables: the layers are stubs now
        home.share(model)
        for ids in calibration_batches(dataset, batch_tokens):
            with contextlib.suppress(_Caught):
                model(input_ids=torch.tensor(ids, device=home.device), use_cache=False)
            per_layer = [c.pop() for c in calls]
            batches.append([per_layer[0][2].to(cache_device),
                            [(args, kwargs) for args, kwargs, _ in per_layer]])
    finally:
        home.to_host(model)
        for i, layer in enumerate(layers):
            holder[i] = layer
    return batches


def calibration_batches(dataset: Any, batch_tokens: int) -> list[list[list[int]]]:
    """The first sample alone (the exactness check's probe), then the rest grouped by length,
    up to ``batch_tokens`` per batch; padding (attention_mask 0) is dropped, not computed."""
    rows = []
    masks = dataset["attention_mask"] if "attention_mask" in dataset.column_names else None
    for i, ids in enumerate(dataset["input_ids"]):
        keep = masks[i] if masks is not None else [1] * len(ids)
        rows.append([t for t, m in zip(ids, keep, strict=True) if m])
    batches = [[rows[0]]] if rows else []
    by_length: dict[int, list[list[int]]] = {}
    for row in rows[1:]:
        by_length.setdefault(len(row), []).append(row)
    for length, group in sorted(by_length.items()):
        size = max(1, batch_tokens // max(length, 1))
        batches += [group[i:i + size] for i in range(0, len(group), size)]
    return batches


def layer_targets(layer: Any) -> list[Any]:
    """The layer's Linears that GPTQModifier gave a weight scheme (its ignore list applied)."""
    return [m for m in layer.modules()
            if getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None]


def layer_mappings(layer: Any, prefix: str,
                   mappings: list[list[Any]]) -> list[tuple[str, Any, list[Any]]]:
    """(label, norm, balance Linears) of each mapping, found inside this decoder layer by the
    modules' full names (``prefix`` is the layer's), as llm-compressor matches targets."""
    named = [(f"{prefix}.{name}" if name else prefix, m) for name, m in layer.named_modules()]
    out = []
    for balance, norm_target in mappings:
        norm = next((m for name, m in named if _weight_dims(m) == 1
                     and _matches(name, m, norm_target)), None)
        if norm is None:
            continue
        label = f"{norm_target.removeprefix('re:')} -> {[b.removeprefix('re:') for b in balance]}"
        out.append((label, norm, [m for name, m in named if _weight_dims(m) == 2
                                  and any(_matches(name, m, b) for b in balance)]))
    return out


def _weight_dims(module: Any) -> int:
    """Norms have a 1-D weight, Linears a 2-D one, containers none: a pattern that also names
    a container (``re:.*mlp``) picks only what can be smoothed."""
    import torch

    weight = getattr(module, "weight", None)
    return weight.dim() if isinstance(weight, torch.nn.Parameter) else 0


def _matches(name: str, module: Any, target: str) -> bool:
    """compressed-tensors' own rule, as llm-compressor resolves mappings: ``re:`` matches the
    name from its start, else the exact name or a class name; its internal modules (the weight
    observers GPTQ attached: ``re:.*gate_proj`` also names ``gate_proj.weight_observer``) never
    match."""
    from compressed_tensors.utils import is_match

    return is_match(name, module, target)


def run_layer(layer: Any, index: int, batch: list[Any]) -> Any:
    args, kwargs = batch[1][index]
    out = layer(batch[0].to(_device(layer)), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _device(layer: Any) -> Any:
    return next(layer.parameters()).device


def calibrate_layer(layer: Any, index: int, batches: list[list[Any]],
                    mappings: list[tuple[str, Any, list[Any]]], strength: float, gptq: Any,
                    check: LayerCheck, phases: Phases, ranks: Ranks = SINGLE) -> float:
    """Calibrate, smooth, check, GPTQ and propagate one decoder layer; returns GPTQ's loss
    (summed over ranks). Each rank checks smoothing on its own probe sample."""
    hessians = SharedHessians(layer_targets(layer))
    ranges = {label: ChannelRange() for label, _, _ in mappings}
    probe_out: dict[str, Any] = {}
    with phases("calibrate (forward, Hessians, ranges)"):
        reference = calibrate(layer, index, batches, hessians, mappings, ranges,
                              check.balance_hooks(mappings, probe_out, "before"), check)
    if ranks.world > 1:
        with phases("merge statistics across ranks"):
            merge_statistics(hessians, ranges, ranks, index)
    with phases("smooth and check"):
        for label, norm, balance in mappings:
            scales = smoothing_scales(ranges[label].dynamic_range(), balance, strength)
            apply_smoothing(norm, balance, scales)
            hessians.smooth_input(balance[0], scales)
        if mappings:
            check.verify(layer, index, batches[0], reference, mappings, probe_out)
    with phases("gptq solves"):
        loss = solve_layer(hessians, gptq, ranks)
    propagate(layer, index, batches, phases)
    return loss


def merge_statistics(hessians: SharedHessians, ranges: dict[str, ChannelRange],
                     ranks: Ranks, index: int) -> None:
    """Every rank's shard into one statistic: Hessian sums and sample counts added, channel
    ranges widened to the union. Same order of collectives on every rank (forward order); a
    Linear that ran on some ranks' samples only (a mixture of experts' router) stops the run."""
    if not ranks.agree(len(hessians.sums)):
        raise QuantizationFailed(
            f"decoder layer {index}: some Linears saw calibration tokens on some ranks only "
            "(a mixture-of-experts router?), so their statistics cannot be merged. Set "
            "quantization.gpus=1, or quantization.pipeline=llm-compressor.", ranks.rank)
    hessians.samples = int(ranks.total(hessians.samples))
    for owner, _ in hessians.groups():
        ranks.sum_(hessians.sums[owner])
    for label in sorted(ranges):
        ranks.min_(ranges[label].low)
        ranks.max_(ranges[label].high)


def solve_layer(hessians: SharedHessians, gptq: Any, ranks: Ranks) -> float:
    """GPTQ on each Hessian group, each solved by one rank and its result sent to the others;
    returns the loss summed over the layer (and the ranks)."""
    groups = hessians.groups()
    owners = ranks.assign([solve_cost(sum(m.weight.shape[0] for m in group),
                                      group[0].weight.shape[1]) for _, group in groups])
    loss = 0.0
    for (owner, group), rank in zip(groups, owners, strict=True):
        if rank == ranks.rank:
            loss += gptq_group(group, hessians.normalized(owner), gptq.block_size,
                               gptq.dampening_frac)
        else:
            del hessians.sums[owner]  # another rank solves it: free the memory now
    for (_, group), rank in zip(groups, owners, strict=True):
        for module in group:
            for name in ("weight", "weight_scale", "weight_zero_point"):
                ranks.broadcast_(getattr(module, name).data, rank)
    return ranks.total(loss)


def calibrate(layer: Any, index: int, batches: list[list[Any]], hessians: SharedHessians,
              mappings: list[tuple[str, Any, list[Any]]], ranges: dict[str, ChannelRange],
              probe_hooks: list[Any], check: LayerCheck) -> Any:
    """The one calibration forward of the layer over every batch; returns the probe batch's
    update (output - input) before smoothing, the exactness check's reference."""
    hooks = [m.register_forward_pre_hook(lambda mod, args: hessians.add(mod, args[0]))
             for m in hessians.modules]
    hooks += [norm.register_forward_hook(lambda _m, _a, out, r=ranges[label]: r.add(
        out[0] if isinstance(out, tuple) else out)) for label, norm, _ in mappings]
    reference = None
    try:
        for number, batch in enumerate(batches):
            out = run_layer(layer, index, batch)
            hessians.samples += batch[0].shape[0]
            if number == 0:
                hessians.end_of_first_batch()
                check.remove_probe_hooks()
                reference = (out - batch[0].to(out.device)).float()
    finally:
        for hook in hooks + probe_hooks:
            hook.remove()
    return reference


class Phases:
    """Seconds per phase, summed over layers (with a sync of the calibration's stream at each
    edge, so they add up; not of the device: the kept inputs' copy on its side stream must not
    be waited for by the phases around it)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()

    def record(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


class LayerCheck:
    """The exactness check of SmoothQuant, per layer, on the probe sample (the first batch):
    the layer's update (output - input) and, in the first layer, each mapping's balanced
    Linears must be what they were before smoothing, within the dtype's rounding
    (``smoothing.tolerances``). A failure names the mapping and stops the run before GPTQ."""

    def __init__(self, tolerance: tuple[float, float], model_type: str) -> None:
        self.linear_tol, self.layer_tol = tolerance
        self.model_type = model_type
        self.layer_changes: list[float] = []
        self.first_layer: dict[str, float] = {}
        self.tokens = 0
        self._probe_hooks: list[Any] = []
        self.seconds = 0.0

    def balance_hooks(self, mappings: list[tuple[str, Any, list[Any]]], store: dict[str, Any],
                      key: str) -> list[Any]:
        if self.layer_changes:  # only the first layer's Linears are compared one by one
            return []
        self._probe_hooks = [linear.register_forward_hook(
            lambda _m, _a, out, name=f"{label}/{i}": store.__setitem__((key, name), out.float()))
            for label, _, balance in mappings for i, linear in enumerate(balance)]
        return self._probe_hooks

    def remove_probe_hooks(self) -> None:
        for hook in self._probe_hooks:
            hook.remove()
        self._probe_hooks = []

    def verify(self, layer: Any, index: int, probe: list[Any], reference: Any,
               mappings: list[tuple[str, Any, list[Any]]], store: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.balance_hooks(mappings, store, "after")
        try:
            update = (run_layer(layer, index, probe) - probe[0].to(reference.device)).float()
        finally:
            self.remove_probe_hooks()
        self.tokens = int(probe[0].shape[0] * probe[0].shape[1])
        self.layer_changes.append(rel_change(reference, update))
        if index == 0:
            for label, _, balance in mappings:
                self.first_layer[label] = max((rel_change(store[("before", f"{label}/{i}")],
                                                          store[("after", f"{label}/{i}")])
                                               for i in range(len(balance))), default=0.0)
        self.seconds += time.perf_counter() - t0
        self._raise_if_changed(index)

    def _raise_if_changed(self, index: int) -> None:
        at_fault = [label for label, v in self.first_layer.items() if v > self.linear_tol]
        change = self.layer_changes[-1]
        if not at_fault and change <= self.layer_tol:
            return
        fault = ("Mapping at fault: " + "; ".join(at_fault) + " (its Linears' outputs in the "
                 "first layer changed; a correct mapping leaves them equal)") if at_fault else (
                 "Every mapped Linear is unchanged, so a norm also feeds Linears its mapping "
                 "leaves out")
        raise SmoothingNotExact(
            f"SmoothQuant changed the model ({self.model_type}): decoder layers [{index}] "
            f"compute something else (relative change {change:.3g}; rounding allows "
            f"{self.layer_tol:.3g}). {fault}. Nothing was written. Fix: {MAPPINGS_HELP}.",
            self.record())

    def layer_record(self, index: int) -> dict[str, Any]:
        """What ``restore`` needs to report this layer as if it had been checked again."""
        return {"layer_change": self.layer_changes[index] if self.layer_changes else None,
                "first_layer": self.first_layer if index == 0 else None,
                "tokens": self.tokens}

    def restore(self, index: int, record: dict[str, Any]) -> None:
        if record["layer_change"] is not None:
            self.layer_changes.append(record["layer_change"])
        if index == 0 and record["first_layer"] is not None:
            self.first_layer = dict(record["first_layer"])
        self.tokens = record["tokens"]

    def record(self) -> dict[str, Any]:
        return {"logits_rel_change": None,
                "max_layer_update_rel_change": max(self.layer_changes, default=0.0),
                "layer_update_rel_change": self.layer_changes,
                "layer_tolerance": self.layer_tol,
                "first_layer_balance_rel_change": self.first_layer,
                "first_layer_tolerance": self.linear_tol, "tokens": self.tokens,
                "probe_s": round(self.seconds, 2), "where": "every layer, as calibrated"}
