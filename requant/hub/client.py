"""The Hub client as the pipeline uses it: where the token comes from, which endpoint, and the
Hub's refusals turned into errors that name the setting to fix.

huggingface_hub already maps status codes to typed errors; what it cannot know is which of our
settings caused them. Only refusals are translated: 5xx, 429 and network faults pass through
untouched so that ``requant.errors.is_transient`` retries them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from requant.errors import PublishError, SettingsError
from requant.settings import HubSettings

if TYPE_CHECKING:
    from huggingface_hub import HfApi

TOKENS_PAGE = "https://huggingface.co/settings/tokens"


def resolve_token(hub: HubSettings) -> str | None:
    if hub.token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(hub.token_secret).get()
        except ValueError as exc:
            raise SettingsError(
                f"hub.token_secret: no Prefect Secret block named {hub.token_secret!r}. Create "
                "it (prefect block create secret) or unset hub.token_secret to use $HF_TOKEN."
            ) from exc
    return os.environ.get("HF_TOKEN") or None


def check_publish_settings(hub: HubSettings) -> None:
    """Preflight: a real publish without credentials must fail before hours of work."""
    if hub.repo_id and not resolve_token(hub):
        raise SettingsError(
            f"hub.repo_id: {hub.repo_id} is set but there is no token. Export HF_TOKEN, set "
            "hub.token_secret to a Prefect Secret block, or unset hub.repo_id for a dry run."
        )


def endpoint(hub: HubSettings) -> str:
    return hub.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_api(hub: HubSettings, token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(hub), token=token)


@contextmanager
def hub_errors(hub: HubSettings, action: str) -> Iterator[None]:
    """Translate the Hub's 4xx answers into a PublishError that says what to change."""
    from huggingface_hub.errors import (
        BadRequestError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError as exc:
        raise PublishError(
            f"{action}: hub.repo_id {hub.repo_id} does not exist or the token cannot see it "
            "(a private repo needs a token of its owner). Check hub.repo_id, and that $HF_TOKEN "
            "or hub.token_secret holds a token with access to it.", _status(exc)) from exc
    except RevisionNotFoundError as exc:
        raise PublishError(
            f"{action}: a revision does not exist in {hub.repo_id} ({_reason(exc)}). "
            f"hub.branch is {hub.branch!r}: create that branch on the Hub first, or set "
            "hub.branch=main.", _status(exc)) from exc
    except BadRequestError as exc:
        raise PublishError(
            f"{action}: the Hub rejected the request as invalid: {_reason(exc)}. If it names "
            "model-card metadata, fix the setting it comes from (source.hub_id for base_model).",
            _status(exc)) from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status == 401:
            raise PublishError(
                f"{action}: the Hub rejected the token (401). $HF_TOKEN or hub.token_secret "
                f"holds an invalid or expired token: create a write token at {TOKENS_PAGE}.",
                status) from exc
        if status == 403:
            raise PublishError(
                f"{action}: the token may not write to {hub.repo_id} (403: {_reason(exc)}). Use "
                f"a token with write access to {hub.repo_id.split('/')[0] if hub.repo_id else ''}"
                f" ({TOKENS_PAGE}).", status) from exc
        raise


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return message or str(exc).strip().splitlines()[-1]
