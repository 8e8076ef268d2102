"""The demo's time against its tolerance, from a real demo run's per-question records.

`make demo` gates at the production tolerance (`min_recovery` 0.957) and decides a good
candidate on 326 cloze questions; on 2 CPU cores each question costs about 0.9 s per model, so
the two evaluations are most of the demo's 17 minutes. A demo under 15 minutes needs fewer
questions, and fewer questions decide only at a looser tolerance. This reads a finished demo
run (its baseline's and candidate's answers to the gate's first stage, in the gate's seeded
order) and, for each tolerance and first-look size, says whether the very same answers would
have passed at look 1 of a two-look gate ([0.5, 1.0], the demo's), and what the flow would
take: the run's measured fixed costs plus the measured cost per question on both sides.

    .venvs/pipeline/bin/python benchmarks/bench_demo_tradeoff.py --run runs/<id> \
        [--config deployments/configs/demo.yaml] [--out docs/measurements/demo-tradeoff.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.evaluation.gate import rule_key  # noqa: E402
from requant.evaluation.sequential import (  # noqa: E402
    critical_values,
    question_order,
    recovery_test,
)
from requant.settings import load_settings  # noqa: E402

TOLERANCES = (0.957, 0.95, 0.93, 0.90)
FIRST_LOOKS = (82, 163, 245, 326)


def answers(run: Path, label: str, key: str) -> dict[int, float]:
    per_doc = json.loads((run / "eval" / label / "per_doc.json").read_text())
    return {int(d): s for d, s in per_doc[key].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished demo run's folder")
    p.add_argument("--config", type=Path, default=ROOT / "deployments" / "configs" / "demo.yaml")
    p.add_argument("--out", type=Path,
                   default=ROOT / "docs" / "measurements" / "demo-tradeoff.json")
    args = p.parse_args()
    settings = load_settings(args.config, [])
    rule = settings.gate.rules[0]
    key = rule_key(rule.task, rule.metric)
    base, cand = answers(args.run, "baseline", key), answers(args.run, "candidate", key)
    total = settings.evaluation.task_limits[rule.task]
    order = [d for d in question_order(list(range(total)), settings.gate.order_seed)
             if d in base and d in cand]  # the first stage's questions, in the gate's order
    summary = json.loads((args.run / "summary.json").read_text())
    timings = summary["timings_s"]
    evals = {label: json.loads((args.run / "eval" / label / "summary.json").read_text())
             ["timings_s"] for label in ("baseline", "candidate")}
    per_question = sum(t[f"task:{rule.task}"] for t in evals.values()) / len(order)
    fixed = timings["flow"] - per_question * len(order)
    z1 = critical_values((0.5, 1.0), 1 - settings.gate.confidence)[0]
    rows = []
    for r in TOLERANCES:
        for n in FIRST_LOOKS:
            ids = order[:n]
            test = recovery_test([base[d] for d in ids], [cand[d] for d in ids], r, z1)
            rows.append({"min_recovery": r, "first_look_questions": n,
                         "statistic": round(test.statistic, 3), "z_look1": round(z1, 3),
                         "passes_at_look_1": test.statistic > z1,
                         "recovery_interval": [round(test.low, 4), test.high and round(
                             test.high, 4)],
                         "flow_min_projected": round((fixed + per_question * n) / 60, 1)})
    out = {"run": str(args.run), "rule": key, "questions_answered": len(order),
           "seconds_per_question_both_models": round(per_question, 3),
           "fixed_flow_s": round(fixed, 1), "measured_flow_s": timings["flow"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"measured flow {timings['flow'] / 60:.1f} min; {per_question:.2f} s per question "
          f"(both models); fixed {fixed / 60:.1f} min")
    print("| min_recovery | questions at look 1 | T | z | passes at look 1 | recovery interval "
          "| flow (projected) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['min_recovery']} | {row['first_look_questions']} | {row['statistic']} | "
              f"{row['z_look1']} | {'yes' if row['passes_at_look_1'] else 'no'} | "
              f"[{row['recovery_interval'][0]}, {row['recovery_interval'][1]}] | "
              f"{row['flow_min_projected']} min |")


if __name__ == "__main__":
    main()
