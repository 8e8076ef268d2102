"""The search's stages, inside the requantize flow (``search.candidates`` set):

    baseline (once) -> for each candidate, in the objective's order:
        quantize -> verify -> evaluate, staged, gated at its share of the error rate
        [-> objective throughput, if it passed: served under the fixed load, measured]
      (a candidate that fails is recorded with why; the others go on)
    -> the winner by the objective, or none

Each candidate writes ``runs/<id>/candidates/<name>/`` laid out as a run of its own
(``checkpoint/``, ``eval/``, ``gate/``), so publishing and promoting the winner read it exactly
as they read a single-candidate run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from requant.atomic import write_text_atomic
from requant.calibration import CalibrationSet
from requant.errors import first_line
from requant.evaluation.gate import GateDecision
from requant.evaluation.lmeval import ModelEvaluation
from requant.evaluation.noise import noise_for_source
from requant.quantization.checkpoint import QuantizedCheckpoint
from requant.quantization.hardware import Accelerator
from requant.quantization.recipes import ResolvedRecipe
from requant.rundir import RunDir
from requant.search import (
    Outcome,
    checkpoint_bytes,
    choose,
    is_measured,
    order_key,
    plot_axis,
    plot_svg,
    render_search,
    search_record,
    stops_at_first_pass,
    table_rows,
    throughput_problem,
)
from requant.settings import Candidate, PipelineSettings
from requant.source import ResolvedSource
from requant.tasks.evaluation import evaluate_baseline, evaluate_candidate
from requant.tasks.gate import record_gate
from requant.tasks.quantization import quantize
from requant.tasks.throughput import measure_candidate_throughput


@dataclass
class Entry:
    """A candidate ready to run: its settings, fitted recipe and ledger key (found in seconds,
    before anything expensive), then what it made."""

    candidate: Candidate
    settings: PipelineSettings
    recipe: ResolvedRecipe
    key: str
    outcome: Outcome
    ckpt: QuantizedCheckpoint | None = None
    decision: GateDecision | None = None


@dataclass
class SearchResult:
    entries: list[Entry]
    winner: Entry | None
    record: dict[str, Any]
    timings: dict[str, float]


def run_search(settings: PipelineSettings, source: ResolvedSource, calib: CalibrationSet | None,
               entries: list[Entry], acc: Accelerator, run_dir: RunDir) -> SearchResult:
    ev, on_gpu = settings.evaluation, acc.kind == "cuda"
    t0 = time.perf_counter()
    baseline = evaluate_baseline(ev, settings.gate, source.as_record(), source.path,
                                 settings.cache_dir, run_dir.stage("eval") / "baseline", on_gpu)
    t1 = time.perf_counter()
    objective = settings.search.objective
    if objective == "smallest":  # sizes are known only once quantized
        for e in entries:
            _quantize(e, source, calib, acc, run_dir)
    for entry in sorted(entries, key=lambda e: order_key(objective)(e.outcome)):
        if entry.ckpt is None and entry.outcome.status == "not run":
            _quantize(entry, source, calib, acc, run_dir)
        if entry.ckpt is not None:
            baseline = _evaluate(entry, baseline, source, on_gpu, run_dir)
        if entry.outcome.status == "pass" and is_measured(objective):
            _measure(entry, on_gpu, run_dir)
        if entry.outcome.status == "pass" and stops_at_first_pass(objective):
            _mark_skipped(entries, entry.candidate.name, objective)
            break
    winner_outcome = choose(objective, [e.outcome for e in entries])
    winner = next((e for e in entries if e.outcome is winner_outcome), None)
    record = search_record(objective, settings.gate.confidence,
                           [e.outcome for e in entries], winner_outcome)
    show_search(record, run_dir, settings.gate.rules[0].min_recovery)
    return SearchResult(entries, winner, record,
                        {"evaluate_baseline": round(t1 - t0, 2),
                         "search": round(time.perf_counter() - t1, 2)})


def candidate_dir(run_dir: RunDir, name: str) -> RunDir:
    return RunDir(run_dir.stage("candidates") / name)


def _quantize(entry: Entry, source: ResolvedSource, calib: CalibrationSet | None,
              acc: Accelerator, run_dir: RunDir) -> None:
    """A candidate that cannot be quantized or verified is a result, not the run's end."""
    o, t = entry.outcome, time.perf_counter()
    out = candidate_dir(run_dir, o.name)
    out.root.mkdir(parents=True, exist_ok=True)
    o.scheme = entry.recipe.scheme
    try:
        entry.ckpt = quantize(entry.settings, source, calib, entry.recipe, acc,
                              out.stage("checkpoint"),
                              {"flow_run_id": str(flow_run.get_id() or ""),
                               "flow_run_name": flow_run.get_name(), "candidate": o.name})
    except Exception as exc:  # recorded; the run fails unless another passes
        o.status, o.why = "error", f"quantization: {first_line(exc)}"
        get_run_logger().warning("candidate %s: %s", o.name, o.why)
        return
    finally:
        o.seconds["quantize"] = round(time.perf_counter() - t, 2)
    o.checkpoint, o.size_bytes = str(entry.ckpt.path), checkpoint_bytes(entry.ckpt.path)


def _evaluate(entry: Entry, baseline: ModelEvaluation, source: ResolvedSource, on_gpu: bool,
              run_dir: RunDir) -> ModelEvaluation:
    o, s, t = entry.outcome, entry.settings, time.perf_counter()
    out = candidate_dir(run_dir, o.name)
    eval_dir = out.stage("eval")
    try:
        candidate, decision, baseline = evaluate_candidate(
            s.evaluation, s.gate, baseline, entry.ckpt.path, eval_dir / "candidate", on_gpu,
            source.as_record(), source.path, s.cache_dir)
        record_gate(decision, baseline, candidate, out.stage("gate"),
                    noise_for_source(s.cache_dir, source.as_record(), s.evaluation, s.gate,
                                     on_gpu))
    except Exception as exc:  # as in _quantize
        o.status, o.why = "error", f"evaluation: {first_line(exc)}"
        get_run_logger().warning("candidate %s: %s", o.name, o.why)
        return baseline
    finally:
        o.seconds["evaluate"] = round(time.perf_counter() - t, 2)
    link_baseline(eval_dir, baseline.result_dir)
    entry.decision, o.gate, o.status = decision, decision.as_record(), decision.status
    o.why = "; ".join(decision.reasons)
    return baseline


def _measure(entry: Entry, on_gpu: bool, run_dir: RunDir) -> None:
    """A passing candidate that cannot serve the load without a failed request is an error:
    the objective has no figure to rank it by, and production would meet the same failures."""
    o, s, t = entry.outcome, entry.settings, time.perf_counter()
    try:
        o.throughput = measure_candidate_throughput(
            o.name, entry.ckpt.path, s.evaluation.server, s.search.load,
            candidate_dir(run_dir, o.name).stage("throughput"), on_gpu)
        problem = throughput_problem(o.throughput)
    except Exception as exc:  # as in _quantize
        problem = first_line(exc)
    finally:
        o.seconds["throughput"] = round(time.perf_counter() - t, 2)
    if problem:
        o.status, o.why = "error", f"throughput: {problem}"
        get_run_logger().warning("candidate %s: %s", o.name, o.why)


def link_baseline(eval_dir: Path, baseline_dir: Path) -> None:
    """The candidate's eval/ holds its baseline as a single run's does (what publish uploads),
    as a relative link to the one baseline every candidate was compared with."""
    link = eval_dir / "baseline"
    if not link.exists():
        os.symlink(os.path.relpath(baseline_dir, eval_dir), link)


def _mark_skipped(entries: list[Entry], winner: str, objective: str) -> None:
    for e in entries:
        if e.outcome.status == "not run":
            e.outcome.why = (f"not needed: {winner} passed first and is better by the "
                             f"objective ({objective})")


def show_search(record: dict[str, Any], run_dir: RunDir, min_recovery: float) -> None:
    """The table and the plot: a Prefect table artifact, a markdown one with the plot, and
    both as files in the run folder."""
    plot = run_dir.stage("candidates") / f"{plot_axis(record['objective']).stem}.svg"
    plot.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plot, plot_svg(record, min_recovery))
    create_table_artifact(key="search-candidates", table=table_rows(record),
                          description=f"search: winner {record['winner'] or 'none'}")
    create_markdown_artifact(key="search", markdown=render_search(record, plot),
                             description=f"search: winner {record['winner'] or 'none'}")

