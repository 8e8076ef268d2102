"""Refuse settings that carry a secret.

Settings are Prefect flow parameters: Prefect stores them with the run, shows them in the UI and
copies them into events and the manifest. A token put in ``evaluation.server.env`` would live in
all of those for good. So a value that looks like a credential is refused at validation, before
any work, with the two places a secret belongs: an environment variable or a Prefect Secret block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

#: Credential formats that are unambiguous wherever they appear.
SECRET_VALUE = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}"          # Hugging Face user access token
    r"|\bBearer\s+\S{8,}"             # an Authorization header value
    r"|\bsk-[A-Za-z0-9_-]{20,}"       # OpenAI-style API key
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub token
    r"|\bAKIA[0-9A-Z]{16}\b"          # AWS access key id
    r"|\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",  # a URL with user:password@ in it
)
#: Keys of free-form mappings (environment variables) whose value is a secret by its name.
SECRET_KEY = re.compile(r"token|secret|passw|credential|api[_-]?key|private[_-]?key|(^|_)key$",
                        re.IGNORECASE)
#: Command-line flags whose next argument is a secret (vLLM's --api-key among them).
SECRET_FLAG = re.compile(r"^--?[\w-]*(token|secret|password|api-key)[\w-]*$", re.IGNORECASE)


def secret_like_fields(model: BaseModel) -> list[str]:
    """Dotted paths of every value that looks like a secret; never the values themselves."""
    return [path for path, _ in _walk(model, "")]


def _walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name), f"{path}.{name}".lstrip("."))
    elif isinstance(value, dict):
        for key, item in value.items():
            if SECRET_KEY.search(str(key)) and item not in (None, ""):
                yield f"{path}.{key}", "named like a secret"
            else:
                yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if isinstance(item, str) and SECRET_FLAG.match(item) and i + 1 < len(value):
                yield f"{path}.{i + 1}", f"the argument of {item}"
            yield from _walk(item, f"{path}.{i}")
    elif isinstance(value, str) and SECRET_VALUE.search(value):
        yield path, "a credential"


def refusal(paths: list[str]) -> str:
    return (f"{', '.join(paths)}: looks like a secret, and settings are stored by Prefect with "
            "the run (parameters, UI, events, manifest). Remove it; give the server its secret "
            "through the worker's environment, and the Hub token through $HF_TOKEN or a Prefect "
            "Secret block (hub.token_secret)")
