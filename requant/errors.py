"""Every error requant raises on purpose, in one place.

Each one ends a run for a reason a person can act on, and its message says what to do. The CLI
maps them to exit codes (``requant --help``): bad input is 2, a refusal by the gate or the
rollout is 1. Library errors that reach a user through their own input are caught where they
happen and re-raised as one of these, naming the field and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from requant.evaluation.gate import GateDecision
    from requant.rollout.state import Release


class RequantError(Exception):
    """Base class: anything requant refuses to do, with the reason."""


class SettingsError(RequantError, ValueError):
    """Settings or inputs a run cannot start with; the message names each field and its fix."""


class ServerError(RequantError, RuntimeError):
    """The vLLM server could not start, died, or stopped answering; the message has its log."""


class CheckpointVerificationError(RequantError, RuntimeError):
    """The saved checkpoint is not what the recipe promised; it was moved aside, not published."""


class DeploymentCheckFailed(RequantError, RuntimeError):
    """A new deployment is not fit for traffic; the message says which check and why."""

    def __init__(self, check: str, reason: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(f"{check} check failed: {reason}")
        self.check, self.reason, self.report = check, reason, report or {}


class SmoothingNotExact(RequantError, RuntimeError):
    """SmoothQuant changed the function the model computes: a wrong mapping for its
    architecture. Stops the run before GPTQ; nothing is written."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


class QuantizationFailed(RequantError, RuntimeError):
    """A calibration rank (quantization.gpus > 1) failed or was killed: the message names the
    rank and its error. Every other rank was stopped and nothing was written."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class GateFailed(RequantError, RuntimeError):
    """The candidate did not pass the gate; nothing was published or promoted."""

    def __init__(self, decision: GateDecision) -> None:
        self.decision = decision
        super().__init__(
            f"gate {decision.status}: nothing leaves the machine.\n  - "
            + "\n  - ".join(decision.reasons)
        )


class RolloutFailed(RequantError, RuntimeError):
    """The new revision was not put into service; what served before still does."""

    def __init__(self, release: Release, check: str, reason: str,
                 report: dict[str, Any] | None = None) -> None:
        super().__init__(f"rollout of {release.label()} rolled back ({check}): {reason}")
        self.release, self.check, self.reason, self.report = release, check, reason, report or {}


class PublishError(RequantError, RuntimeError):
    """The Hub refused a publish or a marker move; the message names the setting to fix.
    Nothing was promoted; a commit may exist, and a re-run finds it (publishing is idempotent)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_transient(exc: BaseException) -> bool:
    """Network faults and 5xx/429 are worth a retry; 4xx (bad token, no access) are not."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry a task only for a transient error."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False
