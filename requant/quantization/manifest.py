"""The manifest: everything needed to tell what a checkpoint is and to reproduce it.

Rendering is a pure function of its inputs so tests can check it without running a quantization.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from requant.hashing import fingerprint

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
TRACKED_LIBRARIES = (
    "requant",
    "llmcompressor",
    "compressed-tensors",
    "transformers",
    "torch",
    "datasets",
    "accelerate",
)


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def render_manifest(
    *,
    source: dict[str, Any],
    recipe: dict[str, Any],
    calibration: dict[str, Any],
    settings: dict[str, Any],
    hardware: dict[str, Any],
    timings: dict[str, float],
    memory: dict[str, float | None],
    versions: dict[str, str | None],
    run: dict[str, Any],
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """Assemble the manifest. ``inputs_fingerprint`` covers exactly what determines the weights:
    source files, recipe, calibration set and library versions, so equal fingerprints mean a
    rerun would reproduce the same checkpoint (the nightly job uses this to skip work)."""
    inputs = {
        "source_files": source.get("files"),
        "source_revision": source.get("revision"),
        "recipe_sha256": recipe.get("sha256"),
        "calibration_fingerprint": calibration.get("fingerprint"),
        "versions": {k: v for k, v in versions.items() if k != "requant"},
    }
    return {
        "manifest_version": MANIFEST_VERSION,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
        "inputs_fingerprint": fingerprint(inputs),
        "source": source,
        "recipe": recipe,
        "calibration": calibration,
        "settings": settings,
        "hardware": hardware,
        "timings_s": timings,
        "peak_memory_gib": memory,
        "versions": versions,
        "run": run,
    }
