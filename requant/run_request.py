"""A run's request: the only thing anyone with the Prefect UI (or ``requant run --set``) chooses.

Two layers of settings (docs/trust.md): the worker operator's *profile* (``requant.profile``)
says where things run and with which rights; a *run request* chooses bounded values from what the
profile offers. Every field here has a bound or an enum in the model itself (the schema Prefect
renders as the run form), and the profile narrows them further when the two are composed
(``requant.profile.compose``). No field is a path, host, port, flag, image, namespace or secret
name, and no value here ever becomes a command-line flag, a config key or code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from requant.errors import OperatorSetting, SettingsError
from requant.settings import PipelineSettings, QuantPreset, apply_overrides, describe_errors

#: A profile, recipe or candidate name: what the operator's catalogs are keyed by.
NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
#: A Hub model id or one of the profile's local sources, as the profile spells it: no option-like
#: leading '-', no separators a command line or a model-args string would split on.
SOURCE = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
#: A Hub branch, tag or commit.
REVISION = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceRequest(_Request):
    model: str | None = Field(None, pattern=SOURCE, description="One of the profile's sources "
                              "(its own model, or allow.sources); unset: the profile's model.")
    revision: str | None = Field(None, pattern=REVISION, description="Hub branch, tag or "
                                 "commit of a Hub source; unset: the profile's.")


class CalibrationRequest(_Request):
    num_samples: int | None = Field(None, gt=0, le=100_000, description="At most the "
                                    "profile's allow.max_num_samples.")
    max_seq_len: int | None = Field(None, gt=0, le=131_072, description="At most the "
                                    "profile's allow.max_seq_len.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Shuffle seed.")


class QuantizationRequest(_Request):
    preset: QuantPreset | None = Field(None, description="A preset; unset: the profile's.")
    recipe: str | None = Field(None, pattern=NAME, description="A recipe by name from the "
                               "profile's allow.recipes catalog (replaces the preset).")
    smoothing_strength: float | None = Field(None, gt=0.0, lt=1.0)
    dampening_frac: float | None = Field(None, gt=0.0, lt=1.0)
    device: Literal["auto", "cuda", "cpu"] | None = None


class EvaluationRequest(_Request):
    enabled: bool | None = Field(None, description="false: stop after quantization (nothing is "
                                 "gated, so nothing is published).")


class GateRequest(_Request):
    min_recovery: float | None = Field(None, gt=0.0, le=1.0, description="Every rule's "
                                       "min_recovery; only stricter than the profile's.")
    confidence: float | None = Field(None, gt=0.5, lt=1.0, description="Only at least the "
                                     "profile's.")


class SearchRequest(_Request):
    candidates: list[str] | None = Field(None, max_length=16, description="Names of the "
                                         "profile's search.candidates to try (a subset).")
    objective: Literal["order", "smallest", "accuracy", "throughput"] | None = None

    @model_validator(mode="after")
    def _names(self) -> SearchRequest:
        import re

        for name in self.candidates or []:
            if not re.fullmatch(NAME, name):
                raise ValueError(f"candidate name {name!r:.80} is not a catalog name "
                                 "(lowercase letters, digits and '-')")
        return self


class HubRequest(_Request):
    dry_run: bool = Field(False, description="Publish nothing (the checkpoint stays local).")


class RunRequest(_Request):
    """What one run asks of the worker's profile; everything else is the profile's."""

    profile: str = Field("demo", pattern=NAME, description="Which of the worker operator's "
                         "profiles runs this (deployments/configs on the worker).")
    source: SourceRequest = Field(default_factory=SourceRequest)
    calibration: CalibrationRequest = Field(default_factory=CalibrationRequest)
    quantization: QuantizationRequest = Field(default_factory=QuantizationRequest)
    evaluation: EvaluationRequest = Field(default_factory=EvaluationRequest)
    gate: GateRequest = Field(default_factory=GateRequest)
    search: SearchRequest = Field(default_factory=SearchRequest)
    hub: HubRequest = Field(default_factory=HubRequest)
    force: bool = Field(False, description="Redo a candidate that was already published.")

    @model_validator(mode="before")
    @classmethod
    def _operator_fields_named(cls, data: Any) -> Any:
        """A field of the profile (a path, host, port, flag, ...) is refused naming itself and
        who sets it, not as a typo."""
        if isinstance(data, dict) and (field := first_operator_field(data)):
            raise ValueError(OperatorSetting(field).message)
        return data


def request_fields() -> list[str]:
    """Every leaf of the run request, dotted (the schema test and docs/trust.md list them)."""
    return sorted(_leaves(RunRequest))


def operator_fields() -> list[str]:
    """Every leaf of the pipeline settings that a run cannot choose."""
    return sorted(set(_leaves(PipelineSettings)) - set(request_fields()))


def first_operator_field(data: dict[str, Any], model: type[BaseModel] = RunRequest,
                         prefix: str = "") -> str | None:
    """The first key in ``data`` that the request has no field for but the settings do."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            return _deepest(dotted, value) if _is_settings_path(dotted) else None
        sub = field.annotation
        nested = isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel)
        if nested and (found := first_operator_field(value, sub, f"{dotted}.")):
            return found
    return None


def parse_request(overrides: list[str] | tuple[str, ...] = (),
                  base: dict[str, Any] | None = None) -> RunRequest:
    """``--set section.field=value`` items as a run request, refused in one line per field."""
    data: dict[str, Any] = dict(base or {})
    apply_overrides(data, overrides)
    return validate_request(data)


def validate_request(data: dict[str, Any] | RunRequest) -> RunRequest:
    if isinstance(data, RunRequest):
        return data
    if isinstance(data, dict) and (field := first_operator_field(data)):
        raise OperatorSetting(field)
    try:
        return RunRequest.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, "invalid run request")) from None


def _deepest(dotted: str, value: Any) -> str:
    """``rollout`` with ``{"local": {"port": 1}}`` is ``rollout.local.port``: the field asked."""
    while isinstance(value, dict) and value:
        key, inner = next(iter(value.items()))
        if not _is_settings_path(f"{dotted}.{key}"):
            break
        dotted, value = f"{dotted}.{key}", inner
    return dotted


def _is_settings_path(dotted: str) -> bool:
    model: Any = PipelineSettings
    for part in dotted.split("."):
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return False
        model = field.annotation
    return True


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _leaves(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out
