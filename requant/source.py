"""Resolve the source model to local files, a pinned revision and content hashes.

A Hub id is resolved to the commit it points at *now*, and that commit, not the branch name, is
what every later step and the manifest use: a model pushed mid-run cannot mix two revisions.
Only metadata and tokenizer files are fetched here; weights are fetched by the quantization stage,
after the calibration set (which needs only the tokenizer) has passed its checks.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from requant.errors import SettingsError
from requant.hashing import hash_ahead, hash_files
from requant.model_files import check_model_folder
from requant.settings import SourceSettings

METADATA_PATTERNS = [
    "*.json",
    "*.jinja",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    model_id: str
    path: Path
    revision: str | None  # Hub commit SHA; None for a local directory
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    is_local: bool = True
    with_weights: bool = False  # whether ``files`` covers the weights (fetched and hashed)

    def as_record(self) -> dict[str, object]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "local": self.is_local,
            "files": self.files,
        }


def check_local_source(src: SourceSettings) -> Path | None:
    """A local source folder, complete and readable (its JSON parsed), or None for a Hub id:
    the CLI asks this before Prefect starts, the flow's source stage again."""
    local = Path(src.model).expanduser()
    if not local.exists():
        return None
    if not (local / "config.json").is_file():
        raise SettingsError(
            f"source.model: {local} exists but has no config.json. Point it at a Hugging "
            "Face model directory (the folder save_pretrained wrote)."
        )
    if src.revision:
        raise SettingsError(
            f"source.revision: {src.revision!r} was given for the local directory {local}. "
            "Revisions apply to Hub ids only; unset source.revision."
        )
    check_model_folder(local)
    return local


def hash_local_source_ahead(src: SourceSettings) -> None:
    """A local source's files (weights included) start hashing now, in the background
    (``hashing.hash_ahead``); anything wrong with the source is left for the checks that say
    it in one line."""
    with contextlib.suppress(Exception):
        local = Path(src.model).expanduser()
        if local.is_dir() and not src.revision:
            hash_ahead(local, model_file_names(local, with_weights=True))


def resolve_source_files(src: SourceSettings, *, with_weights: bool) -> ResolvedSource:
    """Plain function behind the task; also used by the quantization stage to fetch weights."""
    local = check_local_source(src)
    if local is not None:
        names = model_file_names(local, with_weights)
        return ResolvedSource(
            model_id=str(local), path=local.resolve(), revision=None,
            files=hash_files(local, names), with_weights=with_weights,
        )
    if not _HUB_ID.match(src.model):
        raise SettingsError(
            f"source.model: {src.model!r} is neither an existing local directory nor a Hugging "
            "Face Hub id of the form owner/name. Fix the path, or use the Hub id."
        )
    return _resolve_hub(src, with_weights)


def model_file_names(root: Path, with_weights: bool) -> list[str]:
    """The files of a model folder that identify it (and that a model server reads)."""
    import fnmatch

    patterns = METADATA_PATTERNS + (WEIGHT_PATTERNS if with_weights else [])
    return sorted(
        p.name for p in root.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    )


def _resolve_hub(src: SourceSettings, with_weights: bool) -> ResolvedSource:
    import httpx
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = METADATA_PATTERNS + (WEIGHT_PATTERNS if with_weights else [])
    try:
        info = HfApi().model_info(src.model, revision=src.revision)
        commit = info.sha
        path = Path(
            snapshot_download(src.model, revision=commit, allow_patterns=patterns)
        )
    except GatedRepoError as exc:
        raise SettingsError(
            f"source.model: {src.model} is gated. Accept its licence on the Hub and provide a "
            "token with access (HF_TOKEN)."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SettingsError(
            f"source.model: no Hub model {src.model!r} (or no access to it). Check the id, or "
            "set HF_TOKEN for a private repo."
        ) from exc
    except RevisionNotFoundError as exc:
        raise SettingsError(
            f"source.revision: {src.model} has no revision {src.revision!r}. Use an existing "
            "branch, tag or commit SHA."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise SettingsError(
            f"source.model: {src.model} is not in the local Hub cache and the Hub cannot be "
            "reached (offline?). Pre-download it, or point source.model at a local directory."
        ) from exc
    except (ConnectionError, TimeoutError, httpx.TransportError) as exc:  # no route, refused
        raise SettingsError(
            f"source.model: cannot reach the Hub for {src.model} ({type(exc).__name__}). Check "
            "the network or HF_ENDPOINT, or use a local directory."
        ) from exc
    return ResolvedSource(
        model_id=src.model,
        path=path,
        revision=commit,
        files=hash_files(path, model_file_names(path, with_weights)),
        is_local=False,
        with_weights=with_weights,
    )


def fetch_weights(src: SourceSettings, resolved: ResolvedSource) -> ResolvedSource:
    """The same source with its weights present and hashed, pinned to the already-resolved
    commit, so the weights cannot come from a newer push than the tokenizer did. Already
    fetched (the flow hashes a local source's weights for its candidate key): nothing to do."""
    if resolved.with_weights:
        return resolved
    return resolve_source_files(src.model_copy(update={"revision": resolved.revision}),
                                with_weights=True)
