"""Checkpoint verification: is what we saved really the W8A8 model we meant to make?

Runs inside the quantization stage's temporary directory, before the rename that makes the
checkpoint visible, so every checkpoint that exists under its final name has passed it. Checks
are plain functions over the saved config and tensor names, so tests can feed them broken inputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from requant.schemes import SCHEMES


@dataclass(frozen=True)
class ExpectedScheme:
    """What the config must declare. ``None`` fields are not checked (custom recipes)."""

    weight_type: str | None = "int"
    weight_bits: int | None = 8
    activation_type: str | None = "int"
    activation_bits: int | None = 8
    activation_dynamic: bool | None = True
    activation_strategy: str | None = "token"

    @classmethod
    def for_scheme(cls, scheme: str | None) -> ExpectedScheme:
        """What the scheme table (``requant.schemes.SCHEMES``) says a checkpoint of ``scheme``
        declares; nothing checked for a scheme it does not know (a custom recipe's)."""
        row = SCHEMES.get((scheme or "").upper())
        if row is None:
            return cls(None, None, None, None, None, None)
        return cls(*row.weights, *row.activations)


@dataclass
class CheckpointReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    quantized_linear: int = 0
    ignored_linear: list[str] = field(default_factory=list)
    reload_ok: bool | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def check_quantization_config(config: dict[str, Any], expected: ExpectedScheme) -> list[str]:
    qc = config.get("quantization_config")
    if not qc:
        return ["config.json has no quantization_config"]
    problems = []
    if qc.get("quant_method") != "compressed-tensors":
        problems.append(f"quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        return [*problems, "quantization_config has no config_groups"]
    for i, group in enumerate(groups):
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        checks = [
            ("weights.type", w.get("type"), expected.weight_type),
            ("weights.num_bits", w.get("num_bits"), expected.weight_bits),
            ("input_activations.type", a.get("type"), expected.activation_type),
            ("input_activations.num_bits", a.get("num_bits"), expected.activation_bits),
            ("input_activations.dynamic", a.get("dynamic"), expected.activation_dynamic),
            ("input_activations.strategy", a.get("strategy"), expected.activation_strategy),
        ]
        for name, got, want in checks:
            if want is not None and got != want:
                problems.append(f"config group {i}: {name} is {got!r}, expected {want!r}")
    return problems


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """compressed-tensors' convention: a plain name matches the module or its suffix; 're:' is a
    regex matched against the full module name."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def check_coverage(
    linear_names: Iterable[str], tensors: dict[str, str], ignore: Iterable[str]
) -> tuple[list[str], int, list[str]]:
    """Every Linear not ignored must carry a weight scale; returns (problems, quantized, ignored).

    ``tensors`` maps saved tensor names to dtypes (from the safetensors headers).
    """
    ignore = list(ignore)
    problems: list[str] = []
    quantized = 0
    ignored: list[str] = []
    for name in linear_names:
        if is_ignored(name, ignore):
            ignored.append(name)
            continue
        if f"{name}.weight_scale" not in tensors:
            problems.append(f"Linear {name} was not quantized (no {name}.weight_scale)")
        else:
            quantized += 1
    if quantized == 0 and not problems:
        problems.append("no Linear layer was quantized")
    return problems, quantized, ignored


def saved_tensors(checkpoint: Path) -> dict[str, str]:
    from safetensors import safe_open

    tensors: dict[str, str] = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                tensors[key] = str(fh.get_slice(key).get_dtype())
    return tensors


def linear_module_names(checkpoint: Path, trust_remote_code: bool = False) -> list[str]:
    """Names of nn.Linear modules of the architecture, from a weightless (meta) model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def reload_and_forward(checkpoint: Path, trust_remote_code: bool = False) -> list[str]:
    """Load the saved checkpoint the way consumers will and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype="auto", trust_remote_code=trust_remote_code
        )
        ids = tok("The quick brown fox", return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits
    except Exception as exc:  # any failure to load is the finding, not a crash of the check
        return [f"reload failed: {type(exc).__name__}: {exc}"]
    if not torch.isfinite(logits).all():
        return ["reloaded model produced non-finite logits"]
    return []


def verify_checkpoint(
    checkpoint: Path,
    expected: ExpectedScheme,
    ignore: Iterable[str],
    *,
    reload: bool = True,
    trust_remote_code: bool = False,
) -> CheckpointReport:
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    problems = check_quantization_config(config, expected)
    # Coverage is checked against what the recipe *meant* to ignore, not against the saved
    # config's own ignore list, which would only confirm the checkpoint agrees with itself.
    coverage, quantized, ignored = check_coverage(
        linear_module_names(checkpoint, trust_remote_code), saved_tensors(checkpoint), ignore
    )
    problems += coverage
    reload_ok = None
    if reload and not problems:
        reload_problems = reload_and_forward(checkpoint, trust_remote_code)
        reload_ok = not reload_problems
        problems += reload_problems
    return CheckpointReport(not problems, problems, quantized, ignored, reload_ok)
