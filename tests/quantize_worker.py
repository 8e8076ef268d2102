"""One quantization in its own process, as the flow's quantize task runs it (so a test can
``kill -9`` it at a named step): ``python -m tests.quantize_worker job.json`` prints the
manifest's path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from requant.calibration import build_calibration_set
from requant.quantization.checkpoint import quantize_checkpoint
from requant.quantization.hardware import Accelerator
from requant.quantization.manifest import MANIFEST_NAME
from requant.quantization.recipes import resolve_recipe
from requant.quantization.smoothing import fit_to_model
from requant.settings import PipelineSettings
from requant.source import resolve_source_files


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    settings = PipelineSettings.model_validate(job["settings"])
    source = resolve_source_files(settings.source, with_weights=False)
    calib = build_calibration_set(settings.calibration, source, Path(job["calibration_cache"]))
    model_type = json.loads((source.path / "config.json").read_text())["model_type"]
    recipe = fit_to_model(resolve_recipe(settings.quantization), model_type)  # as the flow does
    ckpt = quantize_checkpoint(settings, source, calib, recipe, Accelerator("cpu", "test"),
                               Path(job["out"]), {})
    print(ckpt.path / MANIFEST_NAME)


if __name__ == "__main__":
    main(sys.argv[1])
