"""Quantization recipes, always as llm-compressor recipe YAML.

Presets are written in the same format a user's recipe file uses, so one code path loads, hashes,
records and runs both, and the ``recipe.yaml`` saved with a checkpoint reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from requant.errors import SettingsError, first_line
from requant.hashing import fingerprint
from requant.schemes import render_preset
from requant.settings import QuantizationSettings


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe ready to hand to ``oneshot``: its YAML text, where it came from and its hash."""

    text: str
    origin: str  # "preset:w8a8-int8" or the recipe file's path
    sha256: str
    scheme: str | None  # e.g. "W8A8", "FP8_DYNAMIC"; None when the recipe names none
    needs_calibration_data: bool
    ignore: tuple[str, ...]  # modules the recipe means to leave unquantized (all modifiers)


def preset_recipe(q: QuantizationSettings) -> dict[str, Any]:
    """The preset's recipe (``requant.schemes.PRESETS``) with this run's settings in it."""
    return render_preset(q.preset, q)


def resolve_recipe(q: QuantizationSettings) -> ResolvedRecipe:
    """Turn the settings into a checked recipe, failing with the field to fix before any work."""
    if q.recipe is not None:
        path = Path(q.recipe)
        if not path.is_file():
            raise SettingsError(
                f"quantization.recipe: {path} not found. Point it at an llm-compressor recipe "
                "YAML file, or unset it to use quantization.preset."
            )
        text = path.read_text()
        origin = str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SettingsError(f"quantization.recipe: {path} is not valid YAML "
                                f"({yaml_problem(exc)}). Fix the file, or unset it to use "
                                "quantization.preset.") from None
        if not isinstance(data, dict) or not data:
            raise SettingsError(
                f"quantization.recipe: {path} is not an llm-compressor recipe (expected a mapping "
                "of stages to modifier groups, e.g. quant_stage: {{quant_modifiers: {{...}}}})."
            )
    else:
        data = preset_recipe(q)
        text = yaml.safe_dump(data, sort_keys=False)
        origin = f"preset:{q.preset}"
    _check_with_llmcompressor(text, origin)
    found = modifiers(data)
    return ResolvedRecipe(
        text=text,
        origin=origin,
        sha256=fingerprint(data),
        scheme=next((args["scheme"] for _, args in found
                     if isinstance(args, dict) and "scheme" in args), None),
        needs_calibration_data=any(name in _DATA_MODIFIERS for name, _ in found),
        ignore=tuple(dict.fromkeys(
            pattern for _, args in found if isinstance(args, dict)
            for pattern in (args.get("ignore") or [])
        )),
    )


_DATA_MODIFIERS = {"SmoothQuantModifier", "GPTQModifier", "AWQModifier", "AutoRoundModifier"}


def modifiers(data: Any) -> list[tuple[str, Any]]:
    """(name, args) of every modifier in a recipe, however its stages and groups are nested."""
    found: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("Modifier"):
                found.append((key, value))
            else:
                found.extend(modifiers(value))
    elif isinstance(data, list):
        for item in data:
            found.extend(modifiers(item))
    return found


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, never the file's text: a run's recipe path is a parameter
    anyone with the Prefect UI sets, and PyYAML's message quotes the offending line, which from
    a file that is not a recipe (a .env, a kubeconfig) could be a secret reaching the run's
    logs."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}"


def _problem(exc: Exception) -> str:
    """pydantic's errors as field and message, without the input values its text quotes (the
    same reason as ``yaml_problem``); anything else, its first line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                         for e in exc.errors())[:500].rstrip(".")
    return first_line(exc, 200).rstrip(".")


def _check_with_llmcompressor(text: str, origin: str) -> None:
    """Let llm-compressor itself parse the recipe, so an unknown modifier fails now, not later."""
    from llmcompressor.recipe import Recipe

    try:
        recipe = Recipe.create_instance(text)
    except Exception as exc:
        raise SettingsError(
            f"quantization.recipe: llm-compressor cannot read {origin}: {_problem(exc)}. Fix "
            "the recipe "
            "(see llm-compressor's examples/) or use quantization.preset."
        ) from None
    if not recipe.modifiers:
        raise SettingsError(
            f"quantization.recipe: {origin} defines no modifiers llm-compressor can see. Stage "
            "keys must end in '_stage' and modifier groups in '_modifiers', e.g. "
            "quant_stage: {quant_modifiers: {GPTQModifier: {...}}}."
        )

