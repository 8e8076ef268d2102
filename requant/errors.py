"""Every error requant raises on purpose, in one place.

Each one ends a run for a reason a person can act on, and its message says what to do. The CLI
maps them to exit codes (``requant --help``): bad input is 2, a refusal by the gate or the
rollout is 1. Library errors that reach a user through their own input are caught where they
happen and re-raised as one of these, naming the field and the fix.
"""

from __future__ import annotations

import errno
from typing import Any, Protocol


class Decision(Protocol):
    """What an error needs of a gate decision (requant.evaluation.gate.GateDecision); a
    protocol, so this module imports nothing of the project."""

    status: str
    reasons: list[str]


class Labelled(Protocol):
    """What an error needs of a release (requant.rollout.state.Release)."""

    def label(self) -> str: ...


EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 1, 2


class RequantError(Exception):
    """Base class: anything requant refuses to do, with the reason."""


class SettingsError(RequantError, ValueError):
    """Settings or inputs a run cannot start with; the message names each field and its fix."""


class OperatorSetting(SettingsError):
    """A run asked for a setting that only the worker's operator chooses (docs/trust.md): a
    path, host, port, flag, image, namespace, secret or task file, in the profile."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.fix = ("the worker's operator sets it in the profile on the worker "
                    "(deployments/configs, or --config for the CLI); a run cannot")
        self.message = f"{field}: {self.fix}. Remove it from the run's parameters."
        super().__init__(self.message)


class NotOurs(SettingsError):
    """A Kubernetes object the profile names exists but was not created by requant: it is
    never updated, patched, scaled or deleted."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.kind, self.namespace, self.name = kind, namespace, name
        super().__init__(
            f"rollout.kubernetes: the {kind} {namespace}/{name} was not created by requant (no "
            "app.kubernetes.io/managed-by=requant label and requant.dev/owner annotation), so "
            "requant will not change it. The worker's operator names a Deployment of requant's "
            "own in the profile (rollout.kubernetes.namespace, .deployment).")


class OutsideProfile(SettingsError):
    """A run chose a value the profile does not offer (a source, recipe, candidate, a bound)."""

    def __init__(self, field: str, value: object, offered: str) -> None:
        self.field, self.value, self.offered = field, value, offered
        super().__init__(f"{field}: {str(value)!r:.120} is not offered by this worker's profile; "
                         f"{offered}.")


class StateFileError(RequantError, RuntimeError):
    """A record requant keeps (the router's state or token, a target's state.json, the ledger)
    is unreadable; the message names the file and how to recover."""


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

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(
            f"gate {decision.status}: nothing leaves the machine.\n  - "
            + "\n  - ".join(decision.reasons)
        )


class EvaluationStalled(RequantError, RuntimeError):
    """The baseline was asked for more stages and came back with no more: the candidate's
    staged evaluation would ask again forever. Nothing was published."""

    def __init__(self, asked: int, answered: int) -> None:
        super().__init__(
            f"evaluation: the baseline was asked to answer up to stage {asked} and came back "
            f"with {answered} stage(s); the gate cannot look further. Delete the baseline's "
            "cache entry (cache_dir/baseline-eval/) so it is evaluated again, and re-run.")
        self.asked, self.answered = asked, answered


class RolloutFailed(RequantError, RuntimeError):
    """The new revision was not put into service; what served before still does."""

    def __init__(self, release: Labelled, check: str, reason: str,
                 report: dict[str, Any] | None = None) -> None:
        super().__init__(f"rollout of {release.label()} rolled back ({check}): {reason}")
        self.release, self.check, self.reason, self.report = release, check, reason, report or {}


class PublishError(RequantError, RuntimeError):
    """The Hub refused a publish or a marker move; the message names the setting to fix.
    Nothing was promoted; a commit may exist, and a re-run finds it (publishing is idempotent)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SecretInCommit(RequantError, RuntimeError):
    """A file of the commit holds one of the worker's secrets, or something shaped like a
    credential; nothing was uploaded."""

    def __init__(self, file: str, what: str) -> None:
        self.file, self.what = file, what
        super().__init__(f"publish refused: {file} holds {what}; nothing was uploaded. Find how "
                         "it got there (an evaluation's samples, a task file reading the "
                         "environment) and run again.")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception in one line for a record or a message (its type when it says nothing)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


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


#: Errors that mean "what was given is wrong" (exit 2); every other requant error is a refusal
#: or a failure (exit 1).
_BAD_INPUT: tuple[type[RequantError], ...] = (SettingsError, StateFileError)


def explain(exc: BaseException) -> tuple[int | None, str]:
    """The exit code and one message for any error a command can meet; (None, ...) for a bug,
    which keeps its traceback. Hub HTTP errors say what the Hub refused; a full disk says so."""
    if isinstance(exc, _BAD_INPUT):
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, RequantError):
        return EXIT_REFUSED, str(exc)
    if (hub := _explain_hub(exc)) is not None:
        return hub
    if (prefect := _explain_prefect(exc)) is not None:
        return prefect
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_REFUSED, (f"no space left on the device writing {exc.filename or 'a file'}"
                              ". Free space there (`requant runs prune`), then run again.")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EXIT_BAD_INPUT, (f"permission denied: {exc.filename or exc}. Point the setting "
                                "at a directory this user can write, or fix its permissions.")
    return None, str(exc)


def _explain_prefect(exc: BaseException) -> tuple[int, str] | None:
    """The Prefect API this command talks to did not start, cannot be reached, or refused."""
    import os

    url = os.environ.get("PREFECT_API_URL") or "the temporary server"
    fix = ("Start the project's server (`make prefect-up`: the CLI then uses it) or set "
           "PREFECT_API_URL to a running one, then run the command again.")
    if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in str(exc):
        return EXIT_REFUSED, ("Prefect's temporary server for this command did not start in "
                              f"time (a busy host): nothing ran. {fix}")
    try:
        import httpx
        from prefect.exceptions import ParameterTypeError, PrefectHTTPStatusError
    except ImportError:  # pragma: no cover - the pipeline environment always has both
        return None
    if isinstance(exc, ParameterTypeError):  # a flow's own parameter schema refused a value
        return EXIT_BAD_INPUT, " ".join(str(exc).split()) + " Fix the value and run again."
    if isinstance(exc, PrefectHTTPStatusError):
        return EXIT_REFUSED, (f"the Prefect API at {url} answered "
                              f"{exc.response.status_code}: {first_line(exc)}. {fix}")
    cause: BaseException | None = exc
    while cause is not None:  # Prefect wraps the transport's error ("Failed to reach API")
        if isinstance(cause, httpx.TransportError):
            return EXIT_REFUSED, (f"cannot reach the Prefect API at {url} "
                                  f"({first_line(cause)}): nothing ran. {fix}")
        cause = cause.__cause__ or cause.__context__
    return None


def _explain_hub(exc: BaseException) -> tuple[int, str] | None:
    try:
        from huggingface_hub.errors import (
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - the pipeline environment always has it
        return None
    if isinstance(exc, RevisionNotFoundError):
        return EXIT_BAD_INPUT, ("the Hub has no such revision: check the commit SHA (`git log` "
                                "of the model repo, or the run summary's publish record).")
    if isinstance(exc, RepositoryNotFoundError):
        return EXIT_BAD_INPUT, ("the Hub has no such repository, or the token cannot see it: "
                                "check hub.repo_id and the token's access.")
    if not isinstance(exc, HfHubHTTPError):
        return None
    status = exc.response.status_code if exc.response is not None else None
    first = first_line(exc)
    if status in (401, 403):
        return EXIT_BAD_INPUT, (f"the Hub refused the token ({status}): {first}. Give the "
                                "worker a token with write access to hub.repo_id.")
    return EXIT_REFUSED, (f"the Hub answered {status}: {first}. Nothing was promoted; run "
                          "again (publishing is idempotent).")
