"""A/A: the same model evaluated twice, as the gate evaluates it, to count the answers that flip
from nondeterminism alone (vLLM's batching, thread scheduling), with no quantization at all.

Two fresh vLLM servers on the source model of a settings file, each answering the gate's first
stage (the same seeded questions, the same prompts: the prompt hashes are checked), then per
rule: how many questions differ, and the gate's own decision comparing the model with itself
(it must never FAIL). The figure decides whether the gate needs a noise allowance on this
hardware (docs/evaluation.md, "Noise: the A/A measurement"). The same measurement as
``requant noise`` (requant/evaluation/noise.py), written to docs/measurements/ instead of the
cache a run's gate record reads.

    .venvs/pipeline/bin/python benchmarks/bench_gate_aa.py \
        [--config deployments/configs/demo.yaml] [--stages 1] [--set KEY=VALUE ...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.evaluation.lmeval import hardware_name  # noqa: E402
from requant.evaluation.noise import measure_noise, noise_line  # noqa: E402
from requant.settings import load_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "deployments" / "configs"
                        / "demo.yaml")
    parser.add_argument("--stages", type=int, default=1, help="the gate's stages to answer")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = load_settings(args.config, args.overrides)
    model = Path(settings.source.model)
    started = time.perf_counter()
    record = measure_noise(settings.evaluation, settings.gate, model, stages=args.stages,
                           on_gpu=hardware_name(True).startswith("cuda"))
    out = {"config": str(args.config), "overrides": args.overrides,
           "server_env": settings.evaluation.server.env, "wall_s": round(
               time.perf_counter() - started, 1)} | {
        k: v for k, v in record.items() if k != "evaluated_with"}
    path = args.out or ROOT / "docs" / "measurements" / f"gate-aa-{args.config.stem}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(noise_line(record))
    print(f"prompts paired: {record['prompts_paired']}; the gate on A vs A: "
          f"{record['decision_against_itself']['status']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
