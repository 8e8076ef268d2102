"""Several candidates in one run: which settings each is quantized with, the level each is gated
at, the order they are tried in, and which one wins.

Why Bonferroni: the run promotes one candidate out of k, so its false-promotion rate is the
chance that *any* candidate worse than the tolerance passes. Gating each at (1 - confidence) / k
keeps that at most 1 - confidence whatever the candidates are and however they are ordered
(``benchmarks/bench_gate_multiple_candidates.py`` measured 3.6 % / 4.2 % at k = 3 / 5, against
12.8 % / 23.3 % for "the best that passes" without it). A fixed sequence keeps it too, but stops
the whole search at the first failure, which a search whose first candidate is an experiment
does not want. Stopping at the first pass (objectives ``order`` and ``smallest``) only ever
skips tests, so the bound still holds.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from requant.evaluation.gate import recovery_span
from requant.settings import Candidate, PipelineSettings

Status = Literal["pass", "fail", "inconclusive", "error", "not run"]


def candidate_confidence(confidence: float, k: int) -> float:
    """Each candidate's one-sided level: the run's error rate split evenly over the k tests."""
    return 1.0 - (1.0 - confidence) / k


def candidate_settings(settings: PipelineSettings, cand: Candidate) -> PipelineSettings:
    """The run's settings with this candidate's quantization changes and its share of the
    gate's error rate. A candidate naming a preset drops the run's recipe file (else the file
    would silently win over the preset it asked for)."""
    data = settings.model_dump()
    changes = cand.changes()
    if "preset" in changes and "recipe" not in changes:
        changes["recipe"] = None
    data["quantization"] |= changes
    data["gate"]["confidence"] = candidate_confidence(settings.gate.confidence,
                                                      len(settings.search.candidates))
    return PipelineSettings.model_validate(data)


def checkpoint_bytes(path: Path) -> int:
    """What a deployment downloads and holds: the weight files."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


@dataclass
class Outcome:
    """One candidate's result, whatever happened to it: the table's row."""

    name: str
    changes: dict[str, Any]
    position: int  # in the settings' list: ties go to the earlier one
    status: Status = "not run"
    why: str = ""
    scheme: str | None = None
    size_bytes: int | None = None
    checkpoint: str | None = None
    gate: dict[str, Any] | None = field(default=None, repr=False)
    throughput: dict[str, Any] | None = None  # the load test's record (objective throughput)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def recovery(self) -> float | None:
        """The worst rule's point estimate: a candidate is as good as its weakest task."""
        worst = worst_rule(self.gate)
        return worst["recovery"] if worst else None

    @property
    def tokens_per_s(self) -> float | None:
        return (self.throughput or {}).get("tokens_per_s")

    def as_record(self) -> dict[str, Any]:
        return asdict(self) | {"recovery": self.recovery, "tokens_per_s": self.tokens_per_s}


def worst_rule(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The rule with the lowest recovery: where a candidate's point estimate and interval in
    the table and plot come from."""
    rules = [r for r in (gate or {}).get("rules", []) if r.get("recovery") is not None]
    return min(rules, key=lambda r: r["recovery"]) if rules else None


def order_key(objective: str) -> Callable[[Outcome], tuple[Any, ...]]:
    """smallest: gated smallest first (all are quantized before any is gated); else list order.
    A candidate whose quantization failed has no size and is never gated."""
    if objective == "smallest":
        return lambda o: (o.size_bytes is None, o.size_bytes or 0, o.position)
    return lambda o: (o.position,)


def evaluation_order(objective: str, outcomes: list[Outcome]) -> list[Outcome]:
    return sorted(outcomes, key=order_key(objective))


def stops_at_first_pass(objective: str) -> bool:
    """Gated in the objective's order, the first to pass is the best that can pass."""
    return objective in ("order", "smallest")


def is_measured(objective: str) -> bool:
    """throughput: each candidate that passes is served and measured before one is chosen."""
    return objective == "throughput"


def choose(objective: str, outcomes: list[Outcome]) -> Outcome | None:
    passed = [o for o in outcomes if o.status == "pass"]
    if not passed:
        return None
    if objective == "accuracy":
        return min(passed, key=lambda o: (-(o.recovery or 0.0), o.position))
    if objective == "throughput":  # a passing candidate is measured or marked an error
        return min(passed, key=lambda o: (-(o.tokens_per_s or 0.0), o.position))
    return min(passed, key=order_key(objective))


def throughput_problem(load: dict[str, Any]) -> str | None:
    """Why a measurement cannot rank a candidate: one failed request means it did not serve
    the load, and a faster figure bought with dropped requests is no figure."""
    if load.get("errors"):
        sample = (load.get("error_samples") or ["no sample"])[0]
        return f"{load['errors']} of {load['requests']} requests failed (e.g. {sample})"
    if not load.get("tokens_per_s"):
        return "no tokens generated"
    return None


def search_record(objective: str, confidence: float, outcomes: list[Outcome],
                  winner: Outcome | None) -> dict[str, Any]:
    """What the summary, the gate record and the model card say of the search."""
    return {"objective": objective, "candidates": len(outcomes),
            "run_confidence": confidence,
            "candidate_confidence": candidate_confidence(confidence, len(outcomes)),
            "correction": "bonferroni",
            "winner": winner.name if winner else None,
            "outcomes": [o.as_record() for o in sorted(outcomes, key=lambda o: o.position)]}


def describe_changes(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "quantization's settings"


def table_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate, for a Prefect table artifact."""
    rows = []
    for o in record["outcomes"]:
        rules = (o.get("gate") or {}).get("rules", [])
        rows.append({
            "candidate": o["name"] + (" (winner)" if o["name"] == record["winner"] else ""),
            "changes": describe_changes(o["changes"]), "scheme": o["scheme"] or "",
            "size_mb": round(o["size_bytes"] / 1e6, 2) if o["size_bytes"] else "",
            "rules": "; ".join(_rule_cell(r) for r in rules),
            "questions": (o.get("gate") or {}).get("questions", ""),
            "tokens_per_s": o.get("tokens_per_s") or "",
            "decision": o["status"], "why": o["why"]})
    return rows


def _rule_cell(r: dict[str, Any]) -> str:
    rec = f"{r['recovery']:.3f}" if r.get("recovery") is not None else "n/a"
    return (f"{r['task']} {r['metric']}: recovery {rec} "
            f"{recovery_span(r.get('interval') or {})} {r['status']}")


def render_search(record: dict[str, Any], plot: Path | None) -> str:
    """The markdown artifact: the table, the statistics in one sentence, and the plot."""
    rows = table_rows(record)
    head = list(rows[0]) if rows else []
    lines = [f"# Search: {record['candidates']} candidates, objective `{record['objective']}`, "
             f"winner: {record['winner'] or 'none'}", "",
             f"Each candidate gated at one-sided {record['candidate_confidence']:.2%} "
             f"(Bonferroni: the run's {record['run_confidence']:.0%} split over "
             f"{record['candidates']}), so the run promotes a candidate worse than the tolerance "
             f"with at most {1 - record['run_confidence']:.0%} probability.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(row[h]).replace("|", "/") for h in head) + " |"
              for row in rows]
    if plot is not None and plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        lines += ["", f"![{plot.stem}](data:image/svg+xml;base64,{data})", "",
                  f"(plot: `{plot}`)"]
    return "\n".join(lines)


@dataclass(frozen=True)
class Axis:
    """The plot's x axis: the objective's own figure where it is measured, else the size (the
    trade every search makes)."""

    stem: str  # the plot's file name
    label: str
    unit: str
    value: Callable[[dict[str, Any]], float | None]


def plot_axis(objective: str) -> Axis:
    if is_measured(objective):
        return Axis("recovery-vs-throughput", "generated tokens/s (search.load)", "tok/s",
                    lambda o: o.get("tokens_per_s"))
    return Axis("recovery-vs-size", "checkpoint size (MB)", "MB",
                lambda o: o["size_bytes"] / 1e6 if o["size_bytes"] else None)


def plot_svg(record: dict[str, Any], min_recovery: float) -> str:
    """Accuracy recovery against size (or measured throughput), one point per gated candidate
    with its interval, the margin drawn: a picture of the trade the objective made. Plain SVG,
    so the pipeline needs no plotting library."""
    axis = plot_axis(record["objective"])
    pts = [(o["name"], axis.value(o), o["recovery"], _interval(o.get("gate")), o["status"])
           for o in record["outcomes"] if axis.value(o) and o["recovery"] is not None]
    w, h, pad = 560, 320, 50
    xs = [p[1] for p in pts] or [0.0, 1.0]
    lo_x, hi_x = min(xs) * 0.95, max(xs) * 1.05 or 1.0
    ys = [min_recovery] + [v for p in pts for v in (p[2], *p[3]) if v is not None]
    lo_y, hi_y = min(ys) - 0.02, max(ys) + 0.02

    def x(v: float) -> float:
        return pad + (v - lo_x) / ((hi_x - lo_x) or 1.0) * (w - 2 * pad)

    def y(v: float) -> float:
        return h - pad - (v - lo_y) / ((hi_y - lo_y) or 1.0) * (h - 2 * pad)

    colour = {"pass": "#2a7", "fail": "#c33", "inconclusive": "#d90"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{y(min_recovery):.1f}" x2="{w - pad}" '
           f'y2="{y(min_recovery):.1f}" stroke="#888" stroke-dasharray="4"/>',
           f'<text x="{w - pad}" y="{y(min_recovery) - 4:.1f}" text-anchor="end">'
           f'min_recovery {min_recovery}</text>',
           f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">{axis.label}</text>',
           f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" '
           'text-anchor="middle">recovery (worst rule)</text>']
    for name, at, rec, (low, high), status in pts:
        c = colour.get(status, "#555")
        if low is not None and high is not None:
            out.append(f'<line x1="{x(at):.1f}" y1="{y(low):.1f}" x2="{x(at):.1f}" '
                       f'y2="{y(high):.1f}" stroke="{c}"/>')
        out.append(f'<circle cx="{x(at):.1f}" cy="{y(rec):.1f}" r="4" fill="{c}"/>')
        out.append(f'<text x="{x(at) + 6:.1f}" y="{y(rec) - 6:.1f}">{name} ({status}, '
                   f'{at:.1f} {axis.unit})</text>')
    return "\n".join([*out, "</svg>", ""])


def _interval(gate: dict[str, Any] | None) -> tuple[float | None, float | None]:
    iv = (worst_rule(gate) or {}).get("interval") or {}
    return iv.get("low"), iv.get("high")


def alternatives_text(record: dict[str, Any] | None) -> str:
    """For the model card: what else was tried, and why this one was chosen."""
    if not record:
        return ""
    lines = ["## Alternatives tried", "",
             f"This checkpoint is candidate **{record['winner']}** of {record['candidates']} "
             f"quantized from the same source in one run, chosen by objective "
             f"`{record['objective']}` among those that passed the gate (each gated at "
             f"{record['candidate_confidence']:.2%}, so the run's error rate stays at "
             f"{1 - record['run_confidence']:.0%}).", "",
             "| candidate | changes | size (MB) | recovery | tokens/s | decision | why |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in record["outcomes"]:
        size = f"{o['size_bytes'] / 1e6:.1f}" if o["size_bytes"] else "n/a"
        rec = f"{o['recovery']:.3f}" if o["recovery"] is not None else "n/a"
        tps = f"{o['tokens_per_s']:.1f}" if o.get("tokens_per_s") else "n/a"
        lines.append(f"| {o['name']} | {describe_changes(o['changes'])} | {size} | {rec} | "
                     f"{tps} | {o['status']} | {o['why'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
