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

Re-deriving layer k's inputs costs a forward pass through k stored layers (on an H200, half of
a resumed run's propagation). So every ``inputs_every`` layers the hidden states entering the
next layer are kept too, copied to the host and written by a second thread; a copy still being
written when the next is due is skipped, never waited for. The host buffers they are copied
into are pinned once, on that thread, while the first layers calibrate (``prepare_inputs``),
and each file is written and hashed in one pass with the GIL released (``write_tensor``), so
the calibration thread neither waits for the allocation nor competes for the interpreter.
A resumed run starts from the latest kept inputs at or before its first unfinished layer
whose files verify, and re-derives only from there; the values are the uninterrupted run's,
so the checkpoint stays the same to the bit.

The folder's name is a key of everything that determines the weights (source, recipe,
calibration set, quantization settings, library versions, the accelerator): another run of the
same inputs finds it, anything else never does. It is deleted once the checkpoint is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from requant.atomic import fsync_dir, write_json_atomic
from requant.hashing import fingerprint, hash_files, sha256_file
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
    """``layer-00007.safetensors`` + ``layer-00007.json`` per finished layer; ``inputs-00008/``
    (one file per batch) + ``inputs-00008.json``: the hidden states entering layer 8."""

    def __init__(self, folder: Path, inputs_every: int = 0) -> None:
        self.folder = Path(folder)
        self.inputs_every = inputs_every
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._inputs_writer: ThreadPoolExecutor | None = None
        self._inputs_pending: Future | None = None
        self._pinned: list[Any] = []  # host buffers the kept inputs are copied into, reused
        self._pinned_shapes: list[Any] | None = None

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

    def wants_inputs(self, entering: int, layers: int) -> bool:
        """Keep the inputs of layer ``entering`` now? Every ``inputs_every`` layers, not the
        last layer's, not twice (a resumed run reaches the ones the killed run kept)."""
        return bool(self.inputs_every) and entering % self.inputs_every == 0 \
            and 0 < entering < layers and not self._inputs_paths(entering)[1].is_file()

    def prepare_inputs(self, hidden: list[Any]) -> None:
        """Pin the host buffers the kept inputs will be copied into, on the writer's thread,
        now (the pass's start) instead of at the first copy: 8.6 GB took 4 s on an H200, in
        the calibration's way. A copy due before they are ready is skipped."""
        if not self.inputs_every or not hidden or not hidden[0].is_cuda:
            return
        shapes = [(tuple(h.shape), h.dtype) for h in hidden]
        if self._inputs_writer is None:
            self._inputs_writer = ThreadPoolExecutor(1, thread_name_prefix="requant-inputs")
        self._inputs_pending = self._inputs_writer.submit(self._pin, shapes)

    def _pin(self, shapes: list[Any]) -> None:
        import torch

        if self._pinned_shapes != shapes:
            self._pinned = [torch.empty(shape, dtype=dtype, pin_memory=True)
                            for shape, dtype in shapes]
            self._pinned_shapes = shapes

    def keep_inputs(self, entering: int, hidden: list[Any]) -> bool:
        """The hidden states entering layer ``entering``, written in the background; False
        (skipped) while the previous copy is still being written. On a GPU they are copied
        into pinned host buffers (allocated once, reused) on a side stream: the calibration
        goes on meanwhile (a plain ``.to("cpu")`` of 8.6 GB stalled it 7.4 s on an H200)."""
        if self._inputs_pending is not None:
            if not self._inputs_pending.done():
                return False
            self.wait_inputs()
        copied, host = self._copy_to_host(hidden)
        if self._inputs_writer is None:
            self._inputs_writer = ThreadPoolExecutor(1, thread_name_prefix="requant-inputs")
        self._inputs_pending = self._inputs_writer.submit(
            self._write_inputs, entering, host, self._pending, copied, [hidden])
        return True

    def _copy_to_host(self, hidden: list[Any]) -> tuple[Any, list[Any]]:
        """(an event the copy ends at, or None: no copy; the host tensors)."""
        import torch

        if not hidden or not hidden[0].is_cuda:
            return None, [h.detach() for h in hidden]  # already on the host: nothing to copy
        self._pin([(tuple(h.shape), h.dtype) for h in hidden])  # done already, or shapes changed
        stream = torch.cuda.Stream(device=hidden[0].device)
        stream.wait_stream(torch.cuda.current_stream(hidden[0].device))
        with torch.cuda.stream(stream):
            for dst, src in zip(self._pinned, hidden, strict=True):
                dst.copy_(src.detach(), non_blocking=True)
            copied = stream.record_event()
        return copied, self._pinned

    def wait_inputs(self) -> None:
        pending, self._inputs_pending = self._inputs_pending, None
        if pending is not None:
            pending.result()

    def _inputs_paths(self, entering: int) -> tuple[Path, Path]:
        stem = self.folder / f"inputs-{entering:05d}"
        return stem, stem.with_suffix(".json")

    def _write_inputs(self, entering: int, hidden: list[Any], layer_write: Future | None,
                      copied: Any = None, sources: list[Any] | None = None) -> None:
        """Recorded only after the layer before them is (``layer_write``, waited for on this
        thread, never on the GPU's): kept inputs at k always come with k finished layers.
        ``sources`` holds the GPU tensors until the copy is done (``copied``), then lets
        them go: the calibration frees each as the next layer replaces it."""
        if copied is not None:
            copied.synchronize()
        if sources is not None:
            sources.clear()

        folder, record = self._inputs_paths(entering)
        tmp = folder.with_name(f".tmp-{os.getpid()}-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        digests = {}
        for i, h in enumerate(hidden):
            name = f"batch-{i:05d}.safetensors"
            digests[name] = write_tensor(tmp / name, "hidden", h)
        shutil.rmtree(folder, ignore_errors=True)  # a record-less one a killed run left
        os.replace(tmp, folder)
        fsync_dir(self.folder)
        kill_point(f"inputs-{entering}-written")  # the files, no record: never read
        if layer_write is not None:
            layer_write.result()
        write_json_atomic(record, {"entering": entering, "batches": len(hidden),
                                   "sha256": digests})
        kill_point(f"inputs-{entering}-recorded")
        for earlier in range(1, entering):  # these supersede them: one copy on disk at most
            old_folder, old_record = self._inputs_paths(earlier)
            old_record.unlink(missing_ok=True)  # the record first: a folder alone is never read
            shutil.rmtree(old_folder, ignore_errors=True)

    def kept_inputs(self, finished: int, batches: int, device: str) -> tuple[int, list[Any]]:
        """(k, the hidden states entering layer k) for the latest k <= ``finished`` whose
        files still have their recorded hashes and hold ``batches`` batches; (0, []) if
        none."""
        from safetensors.torch import load_file

        for entering in range(finished, 0, -1):
            folder, record = self._inputs_paths(entering)
            try:
                rec = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("batches") != batches or hash_files(folder) != rec.get("sha256"):
                continue
            return entering, [load_file(str(folder / f"batch-{i:05d}.safetensors"),
                                        device=device)["hidden"] for i in range(batches)]
        return 0, []

    def remove(self) -> None:
        self.wait()
        self.wait_inputs()
        shutil.rmtree(self.folder, ignore_errors=True)


_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def write_tensor(path: Path, name: str, tensor: Any) -> str:
    """``tensor`` (on the host) as a one-tensor safetensors file, fsynced; its sha256. Written
    and hashed from the tensor's own memory in one pass, both with the GIL released (a write
    or a hashlib update of a large buffer drops it), where ``safetensors.torch.save_file``
    builds the file's bytes in Python first, holding the interpreter the calibration thread
    needs for as long as that copy takes."""
    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
    header = json.dumps({name: {"dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix(
        "torch.")], "shape": list(tensor.shape), "data_offsets": [0, data.nbytes]}},
        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the format asks
    head = struct.pack("<Q", len(header)) + header
    digest = hashlib.sha256(head)
    digest.update(data)
    with open(path, "wb", buffering=0) as fh:
        for chunk in (memoryview(head), data):
            while chunk:
                chunk = chunk[fh.write(chunk):]
        os.fsync(fh.fileno())
    return digest.hexdigest()
