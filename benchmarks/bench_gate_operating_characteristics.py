"""Operating characteristics of the gate as a settings file configures it, by seeded simulation
through ``gate.decide()`` (requant.evaluation.operating): every rule of the file, its looks,
confidence and min_recovery.

For each true recovery and discordance (the share of questions whose answer flips), the share of
simulated runs that promote, fail or end inconclusive, and the median / mean number of candidate
questions. Three blocks: at the margin (true recovery = min_recovery: the promote rate is the
gate's level, which must stay <= 1 - confidence at every discordance), good candidates, bad
ones; and a scan of min_recovery against the good/bad goals at their hardest point.

    .venvs/pipeline/bin/python benchmarks/bench_gate_operating_characteristics.py \\
        --config deployments/configs/production-llama3-8b.yaml [--questions 1319] \\
        [--baseline 0.75] [--runs 4000] [--agreement 0.9] [--first-rule-only] [--out F]
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gate_simulation_args import gate_simulation_parser  # noqa: E402
from requant.evaluation.operating import simulate  # noqa: E402
from requant.settings import load_settings  # noqa: E402

GOOD = [(1.0, 0.02), (1.0, 0.05), (1.0, 0.08), (0.995, 0.02), (0.995, 0.05), (0.995, 0.08),
        (0.98, 0.05), (0.97, 0.05)]
BAD = [(0.95, 0.0375), (0.95, 0.08), (0.95, 0.12), (0.95, 0.30), (0.90, 0.08)]
MARGIN_FLIPS = [0.01, 0.02, 0.04, 0.05, 0.08, 0.12, 0.20, 0.30, 0.40]
SCAN = [0.95, 0.955, 0.957, 0.96]


def main() -> None:
    parser = gate_simulation_parser(__doc__.split("\n\n")[0], runs=4000)
    parser.add_argument("--agreement", type=float, default=0.9,
                        help="share of questions on which a further rule's outcome equals the "
                        "first rule's (strict-match vs flexible-extract)")
    parser.add_argument("--first-rule-only", action="store_true",
                        help="gate on the file's first rule alone")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gate = load_settings(args.config).gate
    if args.first_rule_only:  # the level of one rule, as docs/evaluation.md states it
        gate = gate.model_copy(update={"rules": gate.rules[:1]})
    r = gate.rules[0].min_recovery
    started = time.perf_counter()
    seeds = itertools.count(1)  # each row its own random stream: rows are independent

    def run(recovery: float, flip: float, g=gate) -> dict | None:
        try:
            return simulate(g, recovery=recovery, discordance=flip, baseline=args.baseline,
                            questions=args.questions, runs=args.runs,
                            agreement=args.agreement, seed=next(seeds)).as_record()
        except ValueError:  # this flip cannot produce that recovery at this baseline
            return None

    lowest = round((1 - r) * args.baseline + 1e-4, 4)  # the fewest flips that recovery allows
    flips = sorted({max(f, lowest) for f in MARGIN_FLIPS})
    margin = [row for f in flips if (row := run(r, f))]
    good = [row for rec, f in GOOD if (row := run(rec, f))]
    bad = [row for rec, f in BAD if (row := run(rec, f))]
    scan = []
    for mr in SCAN:
        g = gate.model_copy(update={"rules": [rule.model_copy(update={"min_recovery": mr})
                                              for rule in gate.rules]})
        scan.append({"min_recovery": mr, "good_promoted": run(0.995, 0.08, g)["promoted"],
                     "bad_promoted": run(0.95, 0.12, g)["promoted"]})
    out = {"config": str(args.config.relative_to(ROOT) if args.config.is_absolute()
                         else args.config),
           "rules": [f"{x.task} {x.metric}" for x in gate.rules], "questions": args.questions,
           "baseline": args.baseline, "min_recovery": r, "looks": gate.looks,
           "confidence": gate.confidence, "runs": args.runs, "agreement": args.agreement,
           "margin": margin, "good": good, "bad": bad, "min_recovery_scan": scan,
           "seconds": round(time.perf_counter() - started, 1)}
    suffix = "-first-rule" if args.first_rule_only else ""
    out_path = args.out or (ROOT / "docs" / "measurements"
                            / f"gate-oc-{args.config.stem}{suffix}.json")
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.config}: {len(gate.rules)} rule(s), {args.questions} questions, baseline "
          f"{args.baseline}, {args.runs} runs a row")
    print(f"{'recovery':>8} {'flip':>6} {'promote':>8} {'fail':>6} {'inconcl':>8} {'median q':>9}")
    for block, rows in (("margin", margin), ("good", good), ("bad", bad)):
        print(block)
        for row in rows:
            print(f"{row['recovery']:>8} {row['discordance']:>6.4f} {row['promoted']:>8.4f} "
                  f"{row['failed']:>6.3f} {row['inconclusive']:>8.3f} "
                  f"{row['median_questions']:>9.0f}")
    print("min_recovery  good (0.995, 8 %) promoted  bad (0.95, 12 %) promoted")
    for s in scan:
        print(f"{s['min_recovery']:>12} {s['good_promoted']:>25.3f} {s['bad_promoted']:>24.3f}")
    print(markdown(out))
    print(f"wrote {out_path} ({out['seconds']} s)")


def markdown(out: dict) -> str:
    """The tables as docs/evaluation.md shows them."""
    head = ("| true recovery | flip | promoted | failed | inconclusive | median candidate "
            "questions |\n| --- | --- | --- | --- | --- | --- |")
    rows = [f"| {r['recovery']:.3f} | {r['discordance'] * 100:.1f} % | {r['promoted']:.4f} | "
            f"{r['failed']:.3f} | {r['inconclusive']:.3f} | {r['median_questions']:.0f} |"
            for r in out["margin"] + out["good"] + out["bad"]]
    scan = ["| min_recovery | good promoted (≥ 0.95 wanted) | bad promoted (≤ 0.02 wanted) |",
            "| --- | --- | --- |"]
    scan += [f"| {x['min_recovery']} | {x['good_promoted']:.3f} | {x['bad_promoted']:.3f} |"
             for x in out["min_recovery_scan"]]
    return "\n".join([head, *rows, "", *scan])


if __name__ == "__main__":
    main()
