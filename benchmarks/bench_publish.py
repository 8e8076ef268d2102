"""Publish: upload throughput and bytes re-sent on resume, against the Hub-compatible local server.

The checkpoint is the demo model's folder (SmolLM2-135M-Instruct, ~270 MB of safetensors) with a
manifest, published by tasks.publish.publish_checkpoint through the real huggingface_hub client
(classic LFS protocol; the local server does not speak Xet). Scenarios, each on a fresh server:
  fresh           one publish: wall time, bytes on the wire, MB/s
  commit-500      the commit fails once with HTTP 500 after every object was uploaded; the retry
                  re-sends ... (bytes counted)
  drop-mid-upload the weights' PUT is cut after half its bytes; the client's own retry resumes
  repeat          the same content published again: no commit, bytes on the wire

Usage: .venvs/pipeline/bin/python benchmarks/bench_publish.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks LFS, not Xet
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.hashing import fingerprint, sha256_file  # noqa: E402
from requant.hub.publish import publish_checkpoint  # noqa: E402
from requant.settings import HubSettings  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402

TOKEN = "hf_benchmark"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def checkpoint(work: Path) -> tuple[Path, dict]:
    ckpt = work / "checkpoint"
    shutil.copytree(MODEL, ckpt)
    manifest = {
        "source": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                   "local": False},
        "recipe": {"origin": "preset:w8a8-int8", "sha256": "0" * 64, "scheme": "W8A8",
                   "text": "quant_stage: {}\n"},
        "calibration": {}, "settings": {}, "versions": {"requant": "0.1.0"},
        "inputs_fingerprint": fingerprint("benchmark"),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, manifest


def attempt(hub: FakeHub, ckpt: Path, manifest: dict, out: Path) -> dict:
    before, t0 = hub.state.bytes_received, time.perf_counter()
    error = None
    try:
        publish_checkpoint(HubSettings(repo_id="bench/ckpt", endpoint=hub.endpoint), ckpt, None,
                           None, manifest, None, out, TOKEN)
    except Exception as exc:  # the scenario's injected failure
        error = f"{type(exc).__name__}: {str(exc)[:80]}"
    return {"wall_s": round(time.perf_counter() - t0, 2),
            "bytes": hub.state.bytes_received - before, "error": error}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="requant-publish-bench-"))
    ckpt, manifest = checkpoint(work)
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    weights = (ckpt / "model.safetensors").stat().st_size
    report: dict = {"checkpoint_bytes": size, "weights_bytes": weights}

    with FakeHub(TOKEN, work / "s1") as hub:
        fresh = attempt(hub, ckpt, manifest, work / "o1")
        fresh["mb_per_s"] = round(fresh["bytes"] / 2**20 / fresh["wall_s"], 1)
        repeat = attempt(hub, ckpt, manifest, work / "o2")
        report |= {"fresh": fresh, "repeat": repeat}
    with FakeHub(TOKEN, work / "s2") as hub:
        hub.state.inject("commit", 500)
        first = attempt(hub, ckpt, manifest, work / "o3")
        retry = attempt(hub, ckpt, manifest, work / "o4")
        report["commit-500"] = {"first_attempt": first, "retry": retry,
                                "bytes_resent_on_retry": retry["bytes"]}
    with FakeHub(TOKEN, work / "s3") as hub:
        oid = sha256_file(ckpt / "model.safetensors")  # the weights' PUT, not whichever is first
        hub.state.inject(f"lfs-put:{oid}", f"drop:{weights // 2}")
        dropped = attempt(hub, ckpt, manifest, work / "o5")
        report["drop-mid-upload"] = dropped | {
            "bytes_over_checkpoint": dropped["bytes"] - size,
            "resent_fraction_of_weights": round((dropped["bytes"] - size) / weights, 3)}
    shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "docs" / "measurements" / "cpu-publish.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
