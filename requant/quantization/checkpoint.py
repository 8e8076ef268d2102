"""Quantization: llm-compressor ``oneshot`` on the calibration set, saved atomically + manifest.

The model is loaded on the CPU and llm-compressor's sequential pipeline moves one decoder layer at
a time onto the GPU (when there is one), so peak GPU memory is one layer plus its activations,
not the whole model. The llm-compressor call itself lives in requant/oneshot.py.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.atomic import TMP_PREFIX, atomic_directory, flushing, write_json_atomic
from requant.calibration import CalibrationSet, load_prepared
from requant.errors import CheckpointVerificationError
from requant.gpu_memory import quantization_need_bytes, wait_for_gpu_memory
from requant.memory import peak_gpu_gib, peak_rss_gib, reset_gpu_peak
from requant.progress import Report, no_progress
from requant.quantization.distributed import (
    RankJob,
    check_rank_inputs,
    run_ranks,
    shard_bounds,
)
from requant.quantization.hardware import Accelerator
from requant.quantization.manifest import MANIFEST_NAME, library_versions, render_manifest
from requant.quantization.oneshot import (
    compute_dtype,
    load_model,
    quantize_model,
    release_session,
    restore_source_dtype,
)
from requant.quantization.recipes import ResolvedRecipe
from requant.quantization.resume import RESUME_DIR, LayerStore, weights_key
from requant.quantization.single_pass import BATCH_TOKENS
from requant.quantization.verification import CheckpointReport, ExpectedScheme, verify_checkpoint
from requant.settings import PipelineSettings
from requant.source import ResolvedSource, fetch_weights


@dataclass(frozen=True)
class QuantizedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    source: ResolvedSource  # with weights fetched and hashed: the baseline is served from it


def quantize_checkpoint(
    settings: PipelineSettings,
    source: ResolvedSource,
    calib: CalibrationSet | None,
    recipe: ResolvedRecipe,
    acc: Accelerator,
    out_dir: Path,
    run: dict[str, Any],
    report: Report = no_progress,
) -> QuantizedCheckpoint:
    """Quantize and write ``out_dir`` atomically; the manifest is the last file written."""
    q = settings.quantization
    started = time.perf_counter()
    reset_gpu_peak()
    source = fetch_weights(settings.source, source)
    t_fetch = time.perf_counter()
    store = layer_store(settings, source, calib, recipe, acc)
    with atomic_directory(out_dir) as tmp:
        calibrate = calibrate_on_ranks if q.gpus > 1 else calibrate_in_process
        choices = calibrate(settings, source, calib, recipe, acc, tmp, report, store)
        smoothing = choices.pop("smoothing_check", None)
        distributed = choices.pop("distributed", {"ranks": 1})
        t_oneshot = choices.pop("oneshot_s")
        # the whole recipe as it ran (llm-compressor writes only its last oneshot call's)
        (tmp / "recipe.yaml").write_text(recipe.text)
        t_saved = time.perf_counter()
        with flushing(tmp):  # the saved bytes reach the disk while they are verified
            verification = verify_checkpoint(
                tmp, ExpectedScheme.for_scheme(recipe.scheme), recipe.ignore,
                reload=q.verify_reload, trust_remote_code=settings.source.trust_remote_code,
            )
            t_verified = time.perf_counter()
        t_flushed = time.perf_counter()
        if not verification.ok:
            _reject(tmp, out_dir, verification)
        manifest = checkpoint_manifest(settings, source, calib, recipe, acc, choices, run, {
            "fetch_weights": round(t_fetch - started, 2),
            "oneshot": t_oneshot,
            "save": round(t_saved - t_fetch - t_oneshot, 2),
            "verify": round(t_verified - t_saved, 2),
            "flush": round(t_flushed - t_verified, 2),  # the write-back the check did not hide
            "total": round(t_flushed - started, 2)})
        manifest |= {"verification": verification.as_record(), "smoothing_check": smoothing,
                     "distributed": distributed}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    if store is not None:
        store.remove()  # the checkpoint is verified and in place: nothing left to resume
    return QuantizedCheckpoint(Path(out_dir), manifest, source)


def checkpoint_manifest(settings: PipelineSettings, source: ResolvedSource,
                        calib: CalibrationSet | None, recipe: ResolvedRecipe, acc: Accelerator,
                        choices: dict[str, Any], run: dict[str, Any],
                        timings: dict[str, float]) -> dict[str, Any]:
    import torch

    return render_manifest(
        source=source.as_record(),
        recipe={"origin": recipe.origin, "sha256": recipe.sha256, "scheme": recipe.scheme,
                "text": recipe.text},
        calibration=calib.as_record() if calib is not None else {"fingerprint": None},
        settings=settings.model_dump(mode="json"),
        hardware={"kind": acc.kind, "name": acc.name,
                  "capability": list(acc.capability) if acc.capability else None,
                  "torch_threads": torch.get_num_threads(), **choices},
        timings=timings,
        memory={"host_rss": peak_rss_gib(), "gpu_allocated": peak_gpu_gib()},
        versions=library_versions(),
        run=run,
    )


def layer_store(settings: PipelineSettings, source: ResolvedSource,
                calib: CalibrationSet | None, recipe: ResolvedRecipe,
                acc: Accelerator) -> LayerStore | None:
    """Where this exact quantization keeps its finished layers (``quantization.resume``)."""
    q = settings.quantization
    if not q.resume or calib is None:
        return None
    key = weights_key(
        {"revision": source.revision} if source.revision else {"files": source.files},
        recipe.sha256, calib.fingerprint,
        q.model_dump(mode="json", exclude={"device", "recipe", "resume", "verify_reload",
                                           "gpu_memory_wait_s", "resume_inputs_every"}),
        {k: v for k, v in library_versions().items() if k != "requant"}, (acc.kind, acc.name))
    return LayerStore(Path(settings.cache_dir) / RESUME_DIR / key, q.resume_inputs_every)


def calibrate_in_process(
    settings: PipelineSettings, source: ResolvedSource, calib: CalibrationSet | None,
    recipe: ResolvedRecipe, acc: Accelerator, save_to: Path, report: Report,
    store: LayerStore | None = None,
) -> dict[str, Any]:
    """One process, one device: oneshot, then save into the directory being built."""
    q = settings.quantization
    t0 = time.perf_counter()
    compute = compute_dtype(acc)
    model, tokenizer = load_model(source.path, settings.source.trust_remote_code,
                                  dtype=compute or "auto")
    if acc.kind == "cuda":
        wait_for_gpu_memory(quantization_need_bytes(model.config, BATCH_TOKENS),
                            "quantization", q.gpu_memory_wait_s,
                            lambda message: report(0.0, message))
    choices = quantize_model(
        model, tokenizer, recipe.text, load_prepared(calib) if calib is not None else None,
        settings.calibration.max_seq_len, acc,
        allow_tf32=q.allow_tf32, activation_cache=q.activation_cache,
        smoothing_tolerance=q.smoothing_tolerance, pipeline=q.pipeline, store=store,
        report=report,
    )
    choices["oneshot_s"] = round(time.perf_counter() - t0, 2)
    choices |= restore_source_dtype(model, source.path, compute)
    report(0.99, "calibration done; saving and verifying the checkpoint")
    model.save_pretrained(save_to, save_compressed=True)
    tokenizer.save_pretrained(save_to)
    # Verification reloads the checkpoint: let go of the in-memory model (and llm-compressor's
    # session, which holds it) first. On the 135M demo this did not lower the measured peak
    # RSS (docs/calibration.md); large models' tensors are the ones returned to the OS.
    del model
    release_session()
    gc.collect()
    return choices


def calibrate_on_ranks(
    settings: PipelineSettings, source: ResolvedSource, calib: CalibrationSet | None,
    recipe: ResolvedRecipe, acc: Accelerator, save_to: Path, report: Report,
    store: LayerStore | None = None,
) -> dict[str, Any]:
    """``quantization.gpus`` ranks under torchrun; rank 0 saves into ``save_to``. The shards
    and every rank's peak memory go into the manifest, so a run can be reproduced exactly."""
    q = settings.quantization
    check_rank_inputs(q.gpus, calib.stats.samples if calib is not None else None)
    assert calib is not None
    samples = calib.stats.samples
    t0 = time.perf_counter()
    work = save_to.parent / f"{TMP_PREFIX}ranks-{save_to.name}"
    shutil.rmtree(work, ignore_errors=True)
    job = RankJob(
        model_dir=str(source.path), calibration_dir=str(calib.path / "data"),
        recipe_text=recipe.text, max_seq_len=settings.calibration.max_seq_len, device=acc.kind,
        world=q.gpus, save_to=str(save_to), work_dir=str(work),
        trust_remote_code=settings.source.trust_remote_code, allow_tf32=q.allow_tf32,
        activation_cache=q.activation_cache, smoothing_tolerance=q.smoothing_tolerance,
        pipeline=q.pipeline, resume_dir=str(store.folder) if store is not None else None,
        resume_inputs_every=q.resume_inputs_every)
    try:
        result = run_ranks(job, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ranks = result.pop("ranks")
    result["distributed"] = {
        "ranks": q.gpus, "backend": "nccl" if acc.kind == "cuda" else "gloo",
        "sharding": "contiguous shards of the seeded-shuffled calibration set",
        "shards": [list(b) for b in shard_bounds(samples, q.gpus)],
        "peak_memory_gib": ranks}
    result["oneshot_s"] = round(time.perf_counter() - t0, 2)
    report(0.99, "calibration done; verifying the checkpoint")
    return result


def _reject(tmp: Path, out_dir: Path, report: CheckpointReport) -> None:
    """Keep the failed output for inspection under a name no consumer takes for a checkpoint."""
    rejected = out_dir.with_name(out_dir.name + ".rejected")
    shutil.rmtree(rejected, ignore_errors=True)
    tmp.rename(rejected)
    write_json_atomic(rejected / "verification.json", report.as_record())
    raise CheckpointVerificationError(
        "the quantized checkpoint failed verification, so it was not kept as "
        f"{out_dir.name}/ (inspect {rejected}):\n  - " + "\n  - ".join(report.problems)
    )
