"""Several candidates against one baseline: how often the promoted one is a false promotion,
and how often the best good one is promoted, for k = 1, 3, 5 and three ways to gate them (#25's
statistics, measured before the search is built).

Each simulated run draws the baseline's answers once and every candidate's answers against
them (the candidates share the baseline, as a multi-candidate run would), and gates each
candidate through the gate's own ``decide_rule`` with the file's first rule, looks and
confidence (alpha = 1 - confidence). Candidates are listed in the order a run would try them,
the safest first (e.g. SmoothQuant 0.8 W8A8, then stronger schemes), and the objective prefers
the later ones (smaller). Procedures:

- ``unadjusted``: every candidate at alpha; the best that passes is promoted;
- ``bonferroni``: every candidate at alpha / k; the best that passes is promoted;
- ``fixed-sequence``: candidates in order at alpha each, stopping at the first that does not
  pass; the last that passed is promoted (the sequence keeps the family's level at alpha with
  no split, and spends its power in the order given).

A false promotion: the promoted candidate's true recovery is below ``min_recovery``, or at it
(the margin, where the gate's level is defined).

    .venvs/pipeline/bin/python benchmarks/bench_gate_multiple_candidates.py \\
        [--config deployments/configs/production-llama3-8b.yaml] [--runs 2000] [--out F]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gate_simulation_args import gate_simulation_parser  # noqa: E402
from requant.evaluation.gate import decide_rule  # noqa: E402
from requant.evaluation.operating import cell_probabilities  # noqa: E402
from requant.evaluation.sequential import critical_values, look_sizes  # noqa: E402
from requant.settings import GateSettings, load_settings  # noqa: E402

PROCEDURES = ("unadjusted", "bonferroni", "fixed-sequence")
DISCORDANCE = 0.05


def scenarios(k: int, margin: float) -> dict[str, list[float]]:
    """True recoveries in the order tried (safest first)."""
    return {
        "all at the margin": [margin] * k,
        "all good (1.0)": [1.0] * k,
        "good, the last (best by objective) bad (0.95)": [1.0] * (k - 1) + [0.95],
        "the first bad (0.95), the rest good": [0.95] + [1.0] * (k - 1),
    }


def gated(rng, gate: GateSettings, base, recovery: float, alpha: float, baseline: float,
          questions: int) -> tuple[bool, int]:
    """One candidate against ``base`` (the run's baseline answers): passed, questions used."""
    import numpy as np

    rule = gate.rules[0]
    only_b, only_c = cell_probabilities(recovery, DISCORDANCE, baseline)
    u = rng.random(questions)
    cand = np.where(base, u >= only_b / baseline, u < only_c / (1 - baseline)).astype(float)
    sizes = look_sizes(questions, tuple(gate.looks))
    zs = critical_values(tuple(s / questions for s in sizes), alpha)
    base_docs = dict(enumerate(base.astype(float).tolist()))
    for look, (n, z) in enumerate(zip(sizes, zs, strict=True), start=1):
        result = decide_rule(rule, base_docs, dict(enumerate(cand[:n].tolist())), z,
                             last=look == len(sizes), total=questions)
        if result.status in ("pass", "fail", "inconclusive"):
            return result.status == "pass", n
    return False, questions


def simulate(gate: GateSettings, truths: list[float], procedure: str, *, baseline: float,
             questions: int, runs: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    k, alpha = len(truths), 1 - gate.confidence
    margin = gate.rules[0].min_recovery
    level = alpha / k if procedure == "bonferroni" else alpha
    false, best_good, nothing, asked = 0, 0, 0, 0
    good = [i for i, r in enumerate(truths) if r > margin]
    for _ in range(runs):
        base = rng.random(questions) < baseline
        promoted = None
        for i, truth in enumerate(truths):
            passed, used = gated(rng, gate, base, truth, level, baseline, questions)
            asked += used
            if passed:
                promoted = i  # later is better by the objective
            elif procedure == "fixed-sequence":
                break
        if promoted is None:
            nothing += 1
        elif truths[promoted] <= margin:
            false += 1
        elif good and promoted == good[-1]:
            best_good += 1
    return {"procedure": procedure, "k": k, "truths": truths, "runs": runs,
            "false_promotion": false / runs, "best_good_promoted": best_good / runs,
            "nothing_promoted": nothing / runs, "mean_questions_per_run": asked / runs}


def main() -> None:
    parser = gate_simulation_parser(__doc__.split("\n\n")[0], runs=2000)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gate = load_settings(args.config).gate
    started, rows = time.perf_counter(), []
    for k in args.ks:
        for name, truths in scenarios(k, gate.rules[0].min_recovery).items():
            for procedure in PROCEDURES if k > 1 else PROCEDURES[:1]:
                row = simulate(gate, truths, procedure, baseline=args.baseline,
                               questions=args.questions, runs=args.runs)
                rows.append({"scenario": name, **row})
                print(f"k={k} {name:48s} {procedure:15s} false {row['false_promotion']:.4f} "
                      f"best good {row['best_good_promoted']:.3f} nothing "
                      f"{row['nothing_promoted']:.3f} questions/run "
                      f"{row['mean_questions_per_run']:.0f}", flush=True)
    record = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
              else str(args.config), "rule": gate.rules[0].model_dump(mode="json"),
              "confidence": gate.confidence, "looks": gate.looks, "questions": args.questions,
              "baseline": args.baseline, "discordance": DISCORDANCE, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
