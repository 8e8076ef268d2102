"""A/A: the same model evaluated twice, as the gate evaluates it, to count the answers that flip
from nondeterminism alone (vLLM's batching, thread scheduling), with no quantization at all.

Two fresh vLLM servers on the source model of a settings file, each answering the gate's first
stage (the same seeded questions, the same prompts: the prompt hashes are checked), then per
rule: how many questions differ, and the gate's own decision comparing the model with itself
(it must never FAIL). The figure decides whether the gate needs a noise allowance on this
hardware (docs/evaluation.md, "Noise: the A/A measurement").

    .venvs/pipeline/bin/python benchmarks/bench_gate_aa.py \
        [--config deployments/configs/demo.yaml] [--stages 1] [--set KEY=VALUE ...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.evaluation.gate import decide, rule_key, unpaired_prompts  # noqa: E402
from requant.evaluation.lmeval import hardware_name  # noqa: E402
from requant.evaluation.sequential import critical_values  # noqa: E402
from requant.evaluation.staged import evaluate_staged  # noqa: E402
from requant.evaluation.tasks import effective_looks  # noqa: E402
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
    ev, gate = settings.evaluation, settings.gate
    model = Path(settings.source.model)
    on_gpu = hardware_name().startswith("cuda")
    runs = []
    with tempfile.TemporaryDirectory(prefix="requant-aa-") as tmp:
        for label in ("a1", "a2"):
            started = time.perf_counter()
            runs.append(evaluate_staged(label, model, ev, gate, Path(tmp) / label,
                                        on_gpu=on_gpu, upto=args.stages))
            print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)
    a1, a2 = runs
    looks = effective_looks(ev, gate)
    z = critical_values(tuple(looks), 1 - gate.confidence)[args.stages - 1]
    decision = decide(a1.evidence(), a2.evidence(), gate, look=args.stages, looks=len(looks),
                      z=z)
    rules = []
    for rule in gate.rules:
        key = rule_key(rule.task, rule.metric)
        first, second = a1.per_doc[key], a2.per_doc[key]
        flips = sorted(d for d in first if first[d] != second.get(d))
        rules.append({"task": rule.task, "metric": rule.metric, "questions": len(first),
                      "flips": len(flips), "flipped_questions": flips[:50],
                      "score_a1": a1.score(rule.task, rule.metric),
                      "score_a2": a2.score(rule.task, rule.metric)})
    out = {"config": str(args.config), "overrides": args.overrides, "model": str(model),
           "hardware": hardware_name(), "server_env": ev.server.env, "stages": args.stages,
           "rules": rules, "prompts_paired": not unpaired_prompts(
               a1.evidence(), a2.evidence(), {r.task for r in gate.rules}),
           "decision_against_itself": {"status": decision.status, "reasons": decision.reasons},
           "timings_s": [a1.timings_s, a2.timings_s]}
    path = args.out or ROOT / "docs" / "measurements" / f"gate-aa-{args.config.stem}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in rules:
        print(f"{r['task']} {r['metric']}: {r['flips']} of {r['questions']} questions flipped "
              f"({r['score_a1']:.4f} vs {r['score_a2']:.4f})")
    print(f"prompts paired: {out['prompts_paired']}; the gate on A vs A: {decision.status}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
