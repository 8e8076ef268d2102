"""A projection, not a measurement: Llama-3-70B at 512 x 2048 through the single pass, on 1, 2,
4 and 8 GPUs, from runs of its first few decoder layers (bench_quantization_gpu.py --shape 70b
--layers L) and the memory plan's figures for the whole model.

Method (docs/quantization.md, "70B: measured layers, projected model"):
- per device, a least-squares line wall = fixed + per_layer x L through the measured points, and
  the same line per phase (``choices.phases_s``), so every second is either fixed or per layer;
- 80 layers on one GPU: fixed + 80 x per_layer;
- N GPUs (the data-parallel single pass, docs "Past one GPU"): the calibration forwards and the
  propagation split over the ranks (halved on 2 x H200 at 8B: 57.1 -> 29.0 s and 29.3 -> 14.3 s),
  the GPTQ solves and the layer copies do not (12.5 -> 11.2 s and 8.5 -> 9.8 s at 8B), plus what
  one GPU does not pay: torchrun and the ranks' imports, measured 14 s at 8B, taken as is;
- reading and saving the checkpoint are not in the layer benchmark (its weights are built in
  memory) and are left out of both sides; the 8B figures (load 8.2 s, save 7.9-10.6 s for
  16 GB) say they add minutes at 141 GB;
- memory: ``requant.quantization.memory_plan.plan_memory`` for the whole model (read once on N
  ranks), beside the host RSS the measured runs grew per layer.

    python benchmarks/project_70b.py [--out docs/measurements/gpu-70b-projection.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.gpu_memory import GIB  # noqa: E402
from requant.quantization.memory_plan import plan_memory  # noqa: E402

MEASURED = ROOT / "docs" / "measurements"
#: (device, files of its 70B-shape layer runs at 512 x 2048)
RUNS = {
    "NVIDIA H100 80GB HBM3": [f"gpu-h100-70b-{n}-layers-512.json" for n in (2, 6, 10)],
    "NVIDIA H200": [f"gpu-70b-{n}-layers-512.json" for n in (4, 8)],
}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False}
SPLIT = ("calibrate (forward, Hessians, ranges)", "propagate")  # shrink with the ranks
RANKS_FIXED_S = 14.0  # torchrun and the ranks' imports, measured on 2 x H200 at 8B
GPU_TOTAL = {"NVIDIA H100 80GB HBM3": 80 * GIB, "NVIDIA H200": 141 * GIB}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x; (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def load(device: str) -> list[dict]:
    rows = []
    for name in RUNS[device]:
        (row,) = json.loads((MEASURED / name).read_text())["results"]
        assert row["gpu"] == device and row["shape"] == "70b", name
        rows.append(row | {"file": name})
    return sorted(rows, key=lambda r: r["layers"])


def project(device: str) -> dict:
    rows = load(device)
    layers = LLAMA3_70B["num_hidden_layers"]
    wall = fit([(r["layers"], r["wall_s"]) for r in rows])
    phases = {p: fit([(r["layers"], r["choices"]["phases_s"][p]) for r in rows])
              for p in rows[0]["choices"]["phases_s"]}
    rss = fit([(r["layers"], r["peak_host_rss_gib_so_far"]) for r in rows])
    split_s = sum(a + b * layers for p, (a, b) in phases.items() if p in SPLIT)
    one = wall[0] + wall[1] * layers
    by_gpus = {}
    for n in (1, 2, 4, 8):
        seconds = one - split_s + split_s / n + (RANKS_FIXED_S if n > 1 else 0.0)
        plan = plan_memory(LLAMA3_70B, gpus=n, on_gpu=True, fp32=False, samples=512,
                           max_seq_len=2048, gpu_total=GPU_TOTAL[device], read_once=n > 1)
        by_gpus[n] = {"projected_s": round(seconds, 1), "speedup": round(one / seconds, 2),
                      "plan_host_gib": round(plan.host_bytes / GIB, 1),
                      "plan_gpu_gib_per_rank": round(plan.gpu_bytes_per_rank / GIB, 1),
                      "activations_on_gpu": plan.activations_on_gpu}
    return {
        "device": device, "measured": [
            {"file": r["file"], "layers": r["layers"], "wall_s": r["wall_s"],
             "peak_gpu_gib": r["peak_gpu_gib"], "peak_host_rss_gib": r["peak_host_rss_gib_so_far"]}
            for r in rows],
        "fit": {"fixed_s": round(wall[0], 1), "per_layer_s": round(wall[1], 2),
                "max_residual_s": round(max(abs(wall[0] + wall[1] * r["layers"] - r["wall_s"])
                                            for r in rows), 2),
                "per_layer_phases_s": {p: round(b, 2) for p, (_, b) in phases.items()},
                "host_rss_gib_per_layer": round(rss[1], 2)},
        "projection_80_layers": by_gpus,
        "host_rss_80_layers_gib_by_fit": round(rss[0] + rss[1] * layers, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=MEASURED / "gpu-70b-projection.json")
    args = p.parse_args()
    result = {"kind": "projection (not measured): see benchmarks/project_70b.py's docstring",
              "devices": [project(d) for d in RUNS]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for d in result["devices"]:
        f = d["fit"]
        print(f"{d['device']}: {f['fixed_s']} s + {f['per_layer_s']} s/layer "
              f"(max residual {f['max_residual_s']} s), host RSS +{f['host_rss_gib_per_layer']} "
              f"GiB/layer")
        for n, row in d["projection_80_layers"].items():
            print(f"  {n} GPU(s): {row['projected_s'] / 60:.1f} min ({row['speedup']}x); plan: "
                  f"host {row['plan_host_gib']} GiB, GPU {row['plan_gpu_gib_per_rank']} GiB/rank")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
