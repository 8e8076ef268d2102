"""Source stage: the model to quantize, pinned to a commit, before anything heavy starts."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from requant.settings import SourceSettings
from requant.source import ResolvedSource, resolve_source_files


@task(name="resolve-source")
def resolve_source(src: SourceSettings) -> ResolvedSource:
    """Metadata + tokenizer only: weights come later, once the cheap checks have passed."""
    resolved = resolve_source_files(src, with_weights=False)
    get_run_logger().info(
        "source %s resolved to %s (revision %s, %d files hashed)",
        src.model, resolved.path, resolved.revision or "local", len(resolved.files),
    )
    return resolved
