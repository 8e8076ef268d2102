"""Finished decoder layers kept on disk as the single pass completes them, so a quantization
killed at layer k of n (out of memory, preemption, a lost node, ``kill -9``) continues at layer
k instead of layer 0.

Each layer's state (smoothed norms, GPTQ's weights and scales) is written atomically, then its
record (GPTQ's loss, the exactness check's numbers, the file's sha256). A layer counts as
finished only when its record exists and its file still has that hash; the first layer that
does not stops the count, and everything from it is computed again. The resumed run re-derives
the next layer's inputs by running the stored layers exactly as the uninterrupted run ran
them, so its checkpoint is the same to the bit (tests/test_quantization_resume.py).

Layers are written by a background thread while the next layer calibrates (one write in
flight; ``wait`` surfaces its errors), so keeping them costs the GPU no time as long as the disk
writes a layer faster than the GPU calibrates one.

The folder's name is a key of everything that determines the weights (source, recipe,
calibration set, quantization settings, library versions, the accelerator): another run of the
same inputs finds it, anything else never does. It is deleted once the checkpoint is verified.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from requant.atomic import fsync_dir, write_json_atomic
from requant.hashing import fingerprint, sha256_file
from requant.killpoints import kill_point

RESUME_DIR = "quantization-resume"


def weights_key(source: dict[str, Any], recipe_sha256: str, calibration: str | None,
                quantization: dict[str, Any], versions: dict[str, str],
                accelerator: tuple[str, str]) -> str:
    """Everything the weights depend on; paths and the run are left out."""
    return fingerprint({"source": source, "recipe_sha256": recipe_sha256,
                        "calibration": calibration, "quantization": quantization,
                        "versions": versions, "accelerator": list(accelerator)})


class LayerStore:
    """``layer-00007.safetensors`` + ``layer-00007.json`` per finished layer."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.folder / f"layer-{index:05d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def finished(self, layers: int, verify: bool = True) -> list[dict[str, Any]]:
        """The records of layers 0, 1, ... that are complete and whose files verify.
        ``verify=False``: records only, for a rank that never reads the files (rank 0 hashes
        them, and the ranks resume from the least count any of them found)."""
        records = []
        for index in range(layers):
            weights, record = self._paths(index)
            try:
                rec = json.loads(record.read_text())
            except (OSError, ValueError):
                break
            if not weights.is_file() or (verify and sha256_file(weights) != rec.get("sha256")):
                break
            records.append(rec)
        return records

    def save(self, index: int, layer: Any, record: dict[str, Any]) -> None:
        """Keep the finished layer (on the host by now) in the background; the previous
        layer's write must have succeeded first."""
        self.wait()
        tensors = {name: t.detach().to("cpu") for name, t in layer.state_dict().items()}
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="requant-layer-store")
        self._pending = self._writer.submit(self._write, index, tensors, record)

    def wait(self) -> None:
        """Until the last layer handed over is on disk and recorded; its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, index: int, tensors: dict[str, Any], record: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        weights, rec_path = self._paths(index)
        tmp = weights.with_name(f".tmp-{os.getpid()}-{weights.name}")
        save_file({name: t.clone().contiguous() for name, t in tensors.items()}, str(tmp))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, weights)
        fsync_dir(self.folder)
        kill_point(f"layer-{index}-written")  # the file, no record: not finished
        write_json_atomic(rec_path, record | {"sha256": sha256_file(weights)})
        kill_point(f"layer-{index}-recorded")

    def load(self, index: int, layer: Any) -> None:
        from safetensors.torch import load_file

        device = next(layer.parameters()).device
        layer.load_state_dict(load_file(str(self._paths(index)[0]), device=str(device)),
                              strict=True)

    def remove(self) -> None:
        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
