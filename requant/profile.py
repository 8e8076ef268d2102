"""The worker operator's profile, and a run's request composed with it (docs/trust.md).

A *profile* is a settings file on the worker: everything that says where things run and with
which rights (addresses, ports, state/cache/output folders, server and router flags and env,
images, the cluster's context, namespace, Deployment, Secret and PVC names, task folders, Hub
endpoint and repo), plus ``allow:``, what a run may choose beyond the profile's own values (other
sources, a recipe catalog, sample limits). Every settings file under ``deployments/configs`` is
a profile; ``extends: NAME`` starts one from another.

Where a flow run finds its profile is never the run's to choose, nor its environment's (Prefect
lets a custom run override job variables, ``env`` included): it is read by name from the
worker's install, ``/etc/requant/profiles`` when that folder exists, else the ``deployments/
configs`` folder of the checkout requant is installed from. An in-process caller (the CLI, which
the operator types on the worker, or a test) hands its profile over with ``using(profile)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from requant.errors import OutsideProfile, SettingsError
from requant.run_request import NAME, RunRequest
from requant.settings import (
    PROJECT_ROOT,
    PipelineSettings,
    describe_errors,
    read_config,
    validate_settings,
)

#: The operator's system-wide profiles; when this folder exists it is the only place looked in.
SYSTEM_PROFILES = Path("/etc/requant/profiles")
#: Otherwise the profiles shipped with the checkout requant is installed from.
BUNDLED_PROFILES = PROJECT_ROOT / "deployments" / "configs"


class RunAllowance(BaseModel):
    """``allow:`` in a profile: what a run may choose beyond the profile's own values."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(default_factory=list, description="Models a run may choose "
                               "besides the profile's source.model (Hub ids or local folders).")
    recipes: dict[str, Path] = Field(default_factory=dict, description="The recipe catalog: "
                                     "name -> llm-compressor recipe file.")
    max_num_samples: int = Field(1024, gt=0, description="Calibration samples a run may ask.")
    max_seq_len: int = Field(4096, gt=0, description="Calibration length a run may ask.")
    checkpoints: list[Path] = Field(default_factory=list, description="Folders a promote may "
                                    "deploy a local checkpoint from, beside output_dir.")


class OperatorProfile(BaseModel):
    """One profile: a name, the settings every run starts from, and what a run may change."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    settings: PipelineSettings
    allow: RunAllowance = Field(default_factory=RunAllowance)
    origin: str = "embedded default"

    @classmethod
    def of(cls, settings: PipelineSettings, name: str = "demo", **allow: Any) -> OperatorProfile:
        return cls(name=name, settings=settings, allow=RunAllowance(**allow), origin="in-process")


_active: contextvars.ContextVar[OperatorProfile | None] = contextvars.ContextVar(
    "requant_profile", default=None)


@contextlib.contextmanager
def using(profile: OperatorProfile) -> Iterator[OperatorProfile]:
    """Flows started in this process use ``profile`` (the CLI's --config, a test's)."""
    token = _active.set(profile)
    try:
        yield profile
    finally:
        _active.reset(token)


def profile_for(request: RunRequest) -> OperatorProfile:
    """The profile handed over in-process, else the worker's profile named by the request."""
    return _active.get() or load_named(request.profile)


def settings_for(request: RunRequest) -> PipelineSettings:
    """The settings a flow runs with: its profile composed with the run's request."""
    return compose(profile_for(request), request)


def profile_dir() -> Path:
    return SYSTEM_PROFILES if SYSTEM_PROFILES.is_dir() else BUNDLED_PROFILES


def load_named(name: str, folder: Path | None = None) -> OperatorProfile:
    """The worker's profile ``name``; relative paths in it resolve against the project root."""
    if not re.fullmatch(NAME, name):
        raise SettingsError(f"profile: {name!r:.80} is not a profile name (lowercase letters, "
                            "digits and '-').")
    folder = folder or profile_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        offered = sorted(p.stem for p in folder.glob("*.yaml"))
        raise OutsideProfile("profile", name, f"this worker offers {', '.join(offered)}")
    return load_file(path, base=PROJECT_ROOT)


def load_file(path: str | Path | None, base: Path | None = None) -> OperatorProfile:
    """A profile file (the CLI's --config), or the embedded default when ``path`` is None.
    Relative paths resolve against ``base`` (default: the working directory)."""
    if path is None:
        return OperatorProfile(name="demo", settings=validate_settings({}))
    path = Path(path)
    data = _read(path, set())
    allow = data.pop("allow", None) or {}
    try:
        allowance = RunAllowance.model_validate(allow)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, f"{path}: invalid allow section")) from None
    settings = validate_settings(data, base)
    allowance.recipes = {k: _abs(v, base) for k, v in allowance.recipes.items()}
    allowance.sources = [_abs_source(s, base) for s in allowance.sources]
    allowance.checkpoints = [_abs(p, base) for p in allowance.checkpoints]
    return OperatorProfile(name=path.stem, settings=settings, allow=allowance,
                           origin=str(path.resolve()))


def _read(path: Path, seen: set[Path]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise SettingsError(f"config file {path}: 'extends' goes round in a circle.")
    data = read_config(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not re.fullmatch(NAME, parent):
        raise SettingsError(f"config file {path}: extends must name a profile beside it.")
    return _merge(_read(path.parent / f"{parent}.yaml", seen | {path.resolve()}), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def _abs(path: Path, base: Path | None) -> Path:
    return path if path.is_absolute() else (base or Path.cwd()) / path


def _abs_source(source: str, base: Path | None) -> str:
    local = source.startswith(("/", "./", "../")) or ((base or Path.cwd()) / source).exists()
    return str(_abs(Path(source), base).resolve()) if local else source


def checkpoint_in_profile(profile: OperatorProfile, settings: PipelineSettings,
                          checkpoint: str | Path) -> Path:
    """A promote's local checkpoint, only from the profile's output_dir (runs/<id>/checkpoint)
    or its allow.checkpoints folders; symbolic links are followed before the check."""
    path = Path(checkpoint)
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    roots = [Path(settings.output_dir), *profile.allow.checkpoints]
    if not any(path.is_relative_to(Path(root).resolve()) for root in roots):
        raise OutsideProfile("checkpoint", checkpoint, "promote a checkpoint under "
                             + " or ".join(str(r) for r in roots))
    return path


# ---- composing a run ---------------------------------------------------------------------------


def compose(profile: OperatorProfile, request: RunRequest) -> PipelineSettings:
    """The profile's settings with the request's choices, each checked against what the profile
    offers. The result is the whole ``PipelineSettings`` the stages read."""
    data = profile.settings.model_dump()
    _source(profile, request, data)
    _calibration(profile, request, data)
    _quantization(profile, request, data)
    _gate(request, data)
    _search(request, data)
    if request.evaluation.enabled is not None:
        data["evaluation"]["enabled"] = request.evaluation.enabled
    if request.hub.dry_run:
        data["hub"]["repo_id"] = None
    data["force"] = request.force or profile.settings.force
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, "this request on this profile")) from None


def _source(profile: OperatorProfile, request: RunRequest, data: dict[str, Any]) -> None:
    own = profile.settings.source.model
    if (model := request.source.model) is not None:
        offered = {own, *profile.allow.sources}
        match = next((m for m in offered if model in (m, Path(m).name)), None)
        if match is None:
            raise OutsideProfile("source.model", model, "choose one of "
                                 + ", ".join(sorted(Path(m).name for m in offered)))
        data["source"]["model"] = match
    if request.source.revision is not None:
        data["source"]["revision"] = request.source.revision


def _calibration(profile: OperatorProfile, request: RunRequest, data: dict[str, Any]) -> None:
    c, limit = request.calibration, profile.allow
    for field, value, most in (("num_samples", c.num_samples, limit.max_num_samples),
                               ("max_seq_len", c.max_seq_len, limit.max_seq_len)):
        if value is None:
            continue
        if value > most:
            raise OutsideProfile(f"calibration.{field}", value, f"at most {most} (the "
                                 f"profile's allow.max_{field.removeprefix('max_')})")
        data["calibration"][field] = value
    if c.seed is not None:
        data["calibration"]["seed"] = c.seed


def _quantization(profile: OperatorProfile, request: RunRequest, data: dict[str, Any]) -> None:
    q = request.quantization
    for field in ("preset", "smoothing_strength", "dampening_frac", "device"):
        if (value := getattr(q, field)) is not None:
            data["quantization"][field] = value
    if q.preset is not None:
        data["quantization"]["recipe"] = None  # a preset asked for replaces the profile's recipe
    if q.recipe is not None:
        catalog = profile.allow.recipes
        if q.recipe not in catalog:
            raise OutsideProfile("quantization.recipe", q.recipe, "the catalog has "
                                 + (", ".join(sorted(catalog)) or "no recipes; use a preset"))
        data["quantization"]["recipe"] = catalog[q.recipe]


def _gate(request: RunRequest, data: dict[str, Any]) -> None:
    g, gate = request.gate, data["gate"]
    if g.min_recovery is not None:
        least = max(rule["min_recovery"] for rule in gate["rules"])
        if g.min_recovery < least:
            raise OutsideProfile("gate.min_recovery", g.min_recovery,
                                 f"a run may only be stricter than the profile ({least})")
        for rule in gate["rules"]:
            rule["min_recovery"] = g.min_recovery
    if g.confidence is not None:
        if g.confidence < gate["confidence"]:
            raise OutsideProfile("gate.confidence", g.confidence,
                                 f"a run may only be stricter than the profile "
                                 f"({gate['confidence']})")
        gate["confidence"] = g.confidence


def _search(request: RunRequest, data: dict[str, Any]) -> None:
    s = request.search
    if s.objective is not None:
        data["search"]["objective"] = s.objective
    if s.candidates is None:
        return
    offered = {c["name"]: c for c in data["search"]["candidates"]}
    if missing := [n for n in s.candidates if n not in offered]:
        raise OutsideProfile("search.candidates", missing[0], "the profile's candidates are "
                             + (", ".join(offered) or "none"))
    data["search"]["candidates"] = [offered[n] for n in s.candidates]
