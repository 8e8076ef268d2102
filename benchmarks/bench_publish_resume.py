"""Publish: shards over 4 GB, a publisher killed with SIGKILL mid-upload, and what its re-run
sends again.

A synthetic checkpoint (config.json with a W8A8 quantization_config, and shards of the given
sizes) is published by ``tests/publish_worker.py`` (``publish_checkpoint``, the real
huggingface_hub client) in its own process against the Hub-compatible local server, which
speaks the Hub's LFS protocol: one presigned PUT per object up to 5 GB (S3's single-PUT limit),
presigned parts plus a completion call above it. When the first shard is stored and the
largest is half sent, the publisher gets SIGKILL; then the same publish runs again to the end.

Reported: bytes sent before the kill, bytes sent by the re-run, which objects the re-run skipped,
wall times, and that the commit holds intact objects (the server checks sha256 and size).
Xet is not measured: it needs Hugging Face's CAS service, which nothing here provides (see
docs/publish.md).

Usage: .venvs/pipeline/bin/python benchmarks/bench_publish_resume.py [--shard-gb 1 5.5]
       [--out docs/measurements/cpu-publish-resume.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks LFS, not Xet
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakehub import FakeHub  # noqa: E402

TOKEN = "hf_benchmarkTOKEN0123456789abcdef"
REPO = "bench/resume"
BLOCK = 64 * 2**20
QUANT = {"config_groups": {"group_0": {
    "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}},
    "ignore": ["lm_head"]}


def synthetic_checkpoint(work: Path, shard_gb: list[float]) -> tuple[Path, list[int]]:
    ckpt = work / "checkpoint"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "quantization_config": QUANT}))
    sizes = []
    for i, gb in enumerate(shard_gb, 1):
        size = int(gb * 10**9)
        block = os.urandom(BLOCK)
        with open(ckpt / f"model-{i:05d}-of-{len(shard_gb):05d}.safetensors", "wb") as f:
            for n in range(0, size, BLOCK):  # distinct blocks: a counter in each
                f.write((n.to_bytes(8, "little") + block[8:])[:min(BLOCK, size - n)])
        sizes.append(size)
    return ckpt, sizes


def job(hub: FakeHub, ckpt: Path, work: Path, name: str) -> Path:
    manifest = {"source": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                           "local": False},
                "recipe": {"origin": "preset:w8a8-int8", "sha256": "0" * 64, "scheme": "W8A8",
                           "text": "quant_stage: {}\n"},
                "calibration": {}, "settings": {}, "versions": {"requant": "bench"},
                "inputs_fingerprint": "0" * 64}
    path = work / f"{name}.json"
    path.write_text(json.dumps({"repo_id": REPO, "endpoint": hub.endpoint, "out": str(work / name),
                                "checkpoint": str(ckpt), "manifest": manifest}))
    return path


def start(job_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.publish_worker", str(job_path)],
                            cwd=ROOT, env=os.environ | {"HF_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(shard_gb: list[float]) -> dict:
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ckpt, sizes = synthetic_checkpoint(work, shard_gb)
        made_s = time.perf_counter() - t0
        with FakeHub(TOKEN, work / "hub") as hub:
            largest = max(sizes)
            kill_at = sum(sizes) - largest + largest // 2
            t0 = time.perf_counter()
            proc = start(job(hub, ckpt, work, "killed"))
            deadline = time.monotonic() + 1800
            while not (len(hub.state.objects) >= len(sizes) - 1
                       and hub.state.lfs_bytes_received >= kill_at):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"publisher ended before the kill: {proc.stderr.read()}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
            killed_s = time.perf_counter() - t0
            stored = len(hub.state.objects)
            time.sleep(1)  # the server drains what the dead client had already put on the wire
            before = hub.state.lfs_bytes_received
            t0 = time.perf_counter()
            rerun = start(job(hub, ckpt, work, "rerun"))
            out, err = rerun.communicate(timeout=3600)
            assert rerun.returncode == 0, err[-2000:]
            rerun_s = time.perf_counter() - t0
            result = json.loads(out.strip().splitlines()[-1])
            commit = hub.state.repos[REPO].commits[result["commit_sha"]]
            resent = hub.state.lfs_bytes_received - before
            parts = sum(1 for c in hub.state.calls if c[1].startswith("/lfs-part/"))
            return {
                "shard_bytes": sizes, "synthetic_write_s": round(made_s, 1),
                "killed_after_s": round(killed_s, 1), "lfs_bytes_before_kill": before,
                "objects_complete_at_kill": stored,
                "rerun_s": round(rerun_s, 1), "rerun_lfs_bytes": resent,
                "rerun_resent_fraction_of_checkpoint": round(resent / sum(sizes), 3),
                "rerun_skipped_bytes": sum(sizes) - resent,
                "multipart_part_requests": parts, "chunk_size": hub.state.chunk_size,
                "commits": hub.state.commit_count(REPO),
                "committed_shards": sorted(p for p in commit.files if p.endswith(".safetensors")),
            }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-gb", type=float, nargs="+", default=[1.0, 5.5])
    ap.add_argument("--out", type=Path, default=ROOT / "docs/measurements/cpu-publish-resume.json")
    args = ap.parse_args()
    (ROOT / ".cache").mkdir(exist_ok=True)
    record = run(args.shard_gb) | {"command": " ".join(["benchmarks/bench_publish_resume.py",
                                                        *sys.argv[1:]])}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
