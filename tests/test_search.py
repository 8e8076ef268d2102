"""Several candidates in one run (#25): settings, the error-rate split, the objective's choice,
and (slow) the whole search through the flow on a real Prefect server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from requant.errors import SettingsError
from requant.search import (
    Outcome,
    candidate_confidence,
    candidate_settings,
    choose,
    evaluation_order,
    plot_svg,
    render_search,
    search_record,
    throughput_problem,
)
from requant.settings import PipelineSettings, load_settings
from tests.conftest import ROOT

DEMO = ROOT / "deployments" / "configs" / "demo.yaml"
THREE = "search.candidates=[{name: sq08}, {name: sq06, smoothing_strength: 0.6}, {name: all8, " \
        "ignore: []}]"


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_gate_multiple_candidates", ROOT / "benchmarks" / "bench_gate_multiple_candidates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_candidate_is_gated_at_the_runs_error_rate_split_over_the_candidates():
    s = load_settings(DEMO, [THREE])
    gates = [candidate_settings(s, c).gate for c in s.search.candidates]
    assert [g.confidence for g in gates] == [pytest.approx(1 - 0.05 / 3)] * 3
    assert candidate_confidence(0.95, 1) == pytest.approx(0.95)  # one candidate: today's gate
    q = [candidate_settings(s, c).quantization for c in s.search.candidates]
    assert [x.smoothing_strength for x in q] == [0.8, 0.6, 0.8]  # unset fields keep the run's
    assert [x.ignore for x in q] == [["lm_head"], ["lm_head"], []]


def test_a_search_of_candidates_all_at_the_margin_promotes_one_at_most_at_the_gates_rate():
    """The claim the docs make, at its boundary: three candidates whose true recovery is exactly
    min_recovery, each gated as the flow gates it (candidate_settings), promote one in at most
    5 % of runs. The same runs gated at the run's own level (no split) promote one far more
    often, so this test fails if the split is lost."""
    bench = _bench()
    s = load_settings(DEMO, [THREE])
    margin = s.gate.rules[0].min_recovery
    split = candidate_settings(s, s.search.candidates[0]).gate
    kwargs = {"baseline": 0.6, "questions": 652, "runs": 1000, "seed": 7}
    searched = bench.simulate(split, [margin] * 3, "unadjusted", **kwargs)
    unsplit = bench.simulate(s.gate, [margin] * 3, "unadjusted", **kwargs)
    assert searched["false_promotion"] <= 0.05
    assert unsplit["false_promotion"] >= 0.08


def test_candidate_settings_are_refused_in_one_line_naming_the_field():
    with pytest.raises(SettingsError, match=r"search\.candidates\.1\.smoothing_strength: .*"
                                            r"less than 1"):
        load_settings(DEMO, ["search.candidates=[{name: a}, {name: b, smoothing_strength: 1.5}]"])
    with pytest.raises(SettingsError, match="candidate names must be unique; a repeats"):
        load_settings(DEMO, ["search.candidates=[{name: a}, {name: a}]"])
    with pytest.raises(SettingsError, match=r"search\.candidates\.0\.name: String should match"):
        load_settings(DEMO, ["search.candidates=[{name: 'Has Spaces'}]"])
    with pytest.raises(SettingsError, match=r"search needs evaluation\.enabled=true"):
        load_settings(DEMO, ["search.candidates=[{name: a}]", "evaluation.enabled=false"])
    with pytest.raises(SettingsError, match=r"search\.candidates\.0\.bits: Extra inputs"):
        load_settings(DEMO, ["search.candidates=[{name: a, bits: 4}]"])


def test_a_candidate_with_a_missing_recipe_is_refused_naming_the_candidate(tmp_path):
    from requant.preflight import check_candidates
    from requant.quantization.hardware import detect_accelerator

    s = load_settings(DEMO, [f"search.candidates=[{{name: ok}}, {{name: mine, recipe: "
                             f"{tmp_path / 'nope.yaml'}}}]"])
    with pytest.raises(SettingsError, match=r"^search\.candidates\.1 \(mine\): "
                                            r"quantization\.recipe: .*nope\.yaml not found"):
        check_candidates(s, detect_accelerator("cpu"))


def test_a_relative_candidate_recipe_resolves_against_the_working_directory(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, ["search.candidates=[{name: a, recipe: recipes/x.yaml}]"])
    assert s.search.candidates[0].recipe == tmp_path / "recipes" / "x.yaml"


def test_a_candidate_naming_a_preset_drops_the_runs_recipe_file(tmp_path):
    s = PipelineSettings.model_validate({
        "quantization": {"recipe": str(tmp_path / "r.yaml")},
        "search": {"candidates": [{"name": "fp8", "preset": "fp8-dynamic"}, {"name": "file"}]}})
    fp8, file = (candidate_settings(s, c).quantization for c in s.search.candidates)
    assert fp8.recipe is None and fp8.preset == "fp8-dynamic"
    assert file.recipe == tmp_path / "r.yaml"


def _outcome(name, position, status, size=None, recovery=None):
    gate = {"rules": [{"task": "t", "metric": "acc,none", "recovery": recovery, "status": status,
                       "interval": {"low": recovery - 0.02, "high": recovery + 0.02}}]} \
        if recovery is not None else None
    return Outcome(name, {}, position, status=status, size_bytes=size, gate=gate)


@pytest.mark.parametrize(("objective", "winner"), [
    ("order", "b"),  # the first in the list that passed
    ("smallest", "d"),  # the smallest that passed (c is smaller, but failed)
    ("accuracy", "e"),  # the highest recovery among those that passed
])
def test_the_objective_picks_the_winner_among_those_that_passed(objective, winner):
    outcomes = [_outcome("a", 0, "fail", 100, 0.80), _outcome("b", 1, "pass", 300, 0.98),
                _outcome("c", 2, "inconclusive", 50, 0.99), _outcome("d", 3, "pass", 200, 0.99),
                _outcome("e", 4, "pass", 250, 1.01), _outcome("f", 5, "error")]
    assert choose(objective, outcomes).name == winner
    assert choose(objective, [o for o in outcomes if o.status != "pass"]) is None


def _measured(name, position, status, tokens_per_s, recovery=0.99):
    o = _outcome(name, position, status, 100, recovery)
    o.throughput = {"tokens_per_s": tokens_per_s, "errors": 0, "requests": 8}
    return o


def test_throughput_picks_the_fastest_that_passed_and_never_a_faster_one_that_failed():
    outcomes = [_measured("slow", 0, "pass", 50.0), _measured("fast-bad", 1, "fail", 500.0),
                _measured("fast", 2, "pass", 120.0), _measured("twin", 3, "pass", 120.0)]
    assert choose("throughput", outcomes).name == "fast"  # the tie to the earlier one
    record = search_record("throughput", 0.95, outcomes, outcomes[2])
    assert [o["tokens_per_s"] for o in record["outcomes"]] == [50.0, 500.0, 120.0, 120.0]
    svg = plot_svg(record, 0.957)
    assert "generated tokens/s" in svg and "fast (pass, 120.0 tok/s)" in svg


def test_a_measurement_with_one_failed_request_or_no_tokens_cannot_rank_a_candidate():
    ok = {"requests": 64, "errors": 0, "tokens_per_s": 80.0}
    assert throughput_problem(ok) is None
    failed = ok | {"errors": 1, "error_samples": ["HTTP 500: boom"]}
    assert throughput_problem(failed) == "1 of 64 requests failed (e.g. HTTP 500: boom)"
    assert throughput_problem(ok | {"tokens_per_s": 0.0}) == "no tokens generated"


def test_measure_throughput_serves_the_checkpoint_under_the_load_and_stops_its_server(
        tmp_path, monkeypatch):
    """A real server process started and stopped by the pipeline's own code (the stand-in for
    vLLM: the subject is the measurement, not vLLM's speed); a checkpoint that answers the
    load's prompt with HTTP 500 is measured with its failures counted, not as fast."""
    from requant.serving.throughput import measure_throughput
    from requant.settings import LoadSettings, ServerSettings
    from tests.standin_vllm import standin_python

    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(tmp_path / "env")))
    model = tmp_path / "model"
    model.mkdir()
    load = LoadSettings(requests=8, concurrency=4, max_tokens=4, timeout_s=30)
    record = measure_throughput(model, ServerSettings(), load, tmp_path / "a.log", on_gpu=False)
    assert (record["requests"], record["errors"], record["completion_tokens"]) == (8, 0, 32)
    assert record["tokens_per_s"] > 0 and record["load"] == load.model_dump()
    assert record["p95_s"] is not None and throughput_problem(record) is None
    still = subprocess.run(["pgrep", "-f", f"--model {model}"], capture_output=True, text=True)
    assert still.stdout == ""  # the server was stopped, not left serving
    (model / "standin-faults.json").write_text(json.dumps(
        {"when_body_contains": "robot", "status": 500}))
    broken = measure_throughput(model, ServerSettings(), load, tmp_path / "b.log", on_gpu=False)
    assert broken["errors"] == 8 and "8 of 8 requests failed" in throughput_problem(broken)


def test_ties_go_to_the_earlier_candidate_in_the_list():
    twins = [_outcome("x", 0, "pass", 100, 0.99), _outcome("y", 1, "pass", 100, 0.99)]
    for objective in ("order", "smallest", "accuracy"):
        assert choose(objective, twins[::-1]).name == "x"
    for o in twins:
        o.throughput = {"tokens_per_s": 10.0}
    assert choose("throughput", twins[::-1]).name == "x"


def test_smallest_is_gated_smallest_first_and_a_failed_quantization_never():
    outcomes = [_outcome("big", 0, "not run", 300), _outcome("broken", 1, "error"),
                _outcome("small", 2, "not run", 100), _outcome("mid", 3, "not run", 300)]
    assert [o.name for o in evaluation_order("smallest", outcomes)] == [
        "small", "big", "mid", "broken"]
    assert [o.name for o in evaluation_order("order", outcomes)] == [
        "big", "broken", "small", "mid"]


def test_the_table_and_plot_show_every_candidate_and_the_margin(tmp_path):
    outcomes = [_outcome("good", 0, "pass", 2_000_000, 0.99),
                _outcome("bad", 1, "fail", 1_000_000, 0.40), _outcome("broken", 2, "error")]
    outcomes[2].why = "quantization: verification failed | reload"
    record = search_record("order", 0.95, outcomes, outcomes[0])
    svg = plot_svg(record, 0.957)
    assert svg.startswith("<svg") and "min_recovery 0.957" in svg
    assert "good (pass, 2.0 MB)" in svg and "bad (fail, 1.0 MB)" in svg
    assert "broken" not in svg  # no size, no score: nothing to draw
    plot = tmp_path / "p.svg"
    plot.write_text(svg)
    md = render_search(record, plot)
    assert "winner: good" in md and "98.33%" in md and "data:image/svg+xml;base64," in md
    assert md.count("\n| ") == 5  # header, separator, one row per candidate
    assert "verification failed / reload" in md  # a '|' in a reason cannot break the table


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_search_gates_every_candidate_publishes_the_best_that_passes_then_no_ops(
        vllm_tiny_source, tmp_path, monkeypatch):
    """Real Prefect server, llm-compressor, lm-eval and Hub client on the tiny model; the model
    servers are the stand-in answering gsm8k as well as the skill map says (the subject is what
    the search does with scores; real vLLM serves a real candidate in test_e2e_demo). Three
    candidates, objective smallest: the damaged one (also the smallest: lm_head quantized)
    fails, the two good ones tie in size and the first in the list passes, so the third is
    never evaluated. Then the nightly re-run is a no-op, and a search where all fail (here its
    one candidate) publishes nothing and says why."""
    from huggingface_hub import HfApi, hf_hub_download
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from requant.errors import GateFailed
    from requant.status import collect_status, render_status
    from tests.conftest import gsm8k_rows, requantize, tiny_server_settings, write_jsonl
    from tests.fakehub import FakeHub
    from tests.platformkit import wait_events
    from tests.standin_vllm import standin_python

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", "hf_searchtest")
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(
        tmp_path / "serving-env" / "bin",
        skill={"answers": str(ROOT / "data" / "gsm8k" / "test.jsonl"),
               "share": {"candidates/damaged/": 0.3, "candidates/bad-": 0.3, "": 0.9},
               "seconds_per_token": {"candidates/slow/": 0.05}})))
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": r["question"]} for r in gsm8k_rows(8)])
    with FakeHub("hf_searchtest", tmp_path / "hub") as hub:
        base = {
            "source": {"model": str(vllm_tiny_source)},
            "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128},
            "evaluation": {"tasks": ["gsm8k_local"], "task_limits": {}, "limit": 400,
                           "num_fewshot": 0, "max_gen_toks": 16,
                           "server": tiny_server_settings().model_dump()},
            "gate": {"rules": [{"task": "gsm8k_local", "min_baseline": 0.5}],
                     "looks": [1.0]},  # one lm-eval per model: ~13 s each here
            "search": {"objective": "smallest", "candidates": [
                {"name": "damaged", "smoothing_strength": 0.5, "ignore": []},
                {"name": "sq08"}, {"name": "sq06", "smoothing_strength": 0.6}]},
            "hub": {"repo_id": "acme/search", "endpoint": hub.endpoint},
            "rollout": {"target": "none"},
            "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        }
        settings = PipelineSettings.model_validate(base)
        summary = requantize(settings)
        calls = len(hub.state.calls)
        again = requantize(settings)  # the nightly re-run: the winner is already published
        assert again["no_op"] is True and len(hub.state.calls) == calls

        failing = PipelineSettings.model_validate(base | {"search": {"candidates": [
            {"name": "bad-a", "smoothing_strength": 0.5}]}})
        with pytest.raises(GateFailed, match="bad-a: fail"):
            requantize(failing)
        assert len(hub.state.calls) == calls  # nothing published
        fastest = requantize(PipelineSettings.model_validate(base | {
            "hub": {"repo_id": "acme/search-speed", "endpoint": hub.endpoint},
            "search": {"objective": "throughput", "candidates": [
                {"name": "slow", "smoothing_strength": 0.7},
                {"name": "quick", "smoothing_strength": 0.6}],
                "load": {"requests": 8, "concurrency": 4, "max_tokens": 8}}}))
        api = HfApi(endpoint=hub.endpoint, token="hf_searchtest")
        card = Path(hf_hub_download("acme/search", "README.md", endpoint=hub.endpoint,
                                    token="hf_searchtest", cache_dir=tmp_path / "dl"))
        published = {f for f in api.list_repo_files("acme/search")}

    run_dir = Path(summary["run_dir"])
    record = summary["search"]
    assert record["winner"] == "sq08" and record["objective"] == "smallest"
    by_name = {o["name"]: o for o in record["outcomes"]}
    assert by_name["damaged"]["status"] == "fail" and by_name["sq08"]["status"] == "pass"
    assert by_name["sq06"]["status"] == "not run" and "sq08 passed first" in by_name["sq06"]["why"]
    assert by_name["damaged"]["size_bytes"] < by_name["sq08"]["size_bytes"] \
        == by_name["sq06"]["size_bytes"]
    assert by_name["damaged"]["recovery"] < 0.5 and by_name["sq08"]["recovery"] == 1.0
    decision = json.loads((run_dir / "candidates" / "sq08" / "gate" / "decision.json")
                          .read_text())
    assert decision["promote"] is True
    assert decision["thresholds"]["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert summary["checkpoint"] == str(run_dir / "candidates" / "sq08" / "checkpoint")
    assert summary["publish"]["repo_id"] == "acme/search"
    assert not (run_dir / "candidates" / "sq06" / "gate").exists()  # never evaluated

    text = card.read_text()
    assert "## Alternatives tried" in text and "candidate **sq08** of 3" in text
    assert "| damaged | smoothing_strength=0.5, ignore=[] |" in text and "| sq06 |" in text
    assert {"eval/gate-decision.json", "eval/baseline/summary.json",
            "eval/candidate/summary.json"} <= published

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[summary["run_id"]])))
        failed_events = wait_events(client, "requant.gate.failed", lambda e: bool(
            e["payload"].get("candidates")))
    keys = {a.key for a in artifacts}
    assert {"search", "search-candidates", "requant-run-summary"} <= keys
    table = next(a for a in artifacts if a.key == "search-candidates")
    assert "sq08 (winner)" in str(table.data) and "damaged" in str(table.data)
    assert "data:image/svg+xml;base64," in next(a for a in artifacts if a.key == "search").data
    assert (run_dir / "candidates" / "recovery-vs-size.svg").is_file()
    rows = next(e for e in failed_events if e["payload"]["candidates"])["payload"]["candidates"]
    assert [(r["candidate"], r["decision"]) for r in rows] == [("bad-a", "fail")]

    # throughput: both pass and are served under the same load; the faster one wins
    speed = {o["name"]: o for o in fastest["search"]["outcomes"]}
    assert fastest["search"]["winner"] == "quick"
    assert speed["slow"]["status"] == speed["quick"]["status"] == "pass"
    assert 0 < speed["slow"]["tokens_per_s"] < speed["quick"]["tokens_per_s"]
    assert speed["slow"]["throughput"]["requests"] == 8 and not speed["quick"]["throughput"][
        "errors"]
    speed_dir = Path(fastest["run_dir"]) / "candidates"
    assert json.loads((speed_dir / "quick" / "throughput" / "throughput.json").read_text())[
        "tokens_per_s"] == speed["quick"]["tokens_per_s"]
    assert "tok/s" in (speed_dir / "recovery-vs-throughput.svg").read_text()

    status = render_status(collect_status(settings))
    assert f"{summary['run_id']}: finished gate pass" in status
    assert "search of 3 (smallest): winner sq08" in status
    assert "gate fail, nothing published; search of 1 (order): winner none" in status


def test_the_shipped_search_demo_config_loads_and_its_candidates_pass_preflight(monkeypatch):
    """The README's search command, up to what a fast test can run: the file as shipped,
    relative paths from the checkout, every candidate's recipe resolved and parsed by
    llm-compressor and its scheme servable on this CPU. (Run whole, it takes ~15 minutes
    here: docs/evaluation.md has its outcome and wall time.)"""
    from requant.preflight import check_candidates
    from requant.quantization.hardware import detect_accelerator

    monkeypatch.chdir(ROOT)
    s = load_settings("deployments/configs/search-demo.yaml")
    checked = check_candidates(s, detect_accelerator("cpu"))
    assert [c.name for c, _, _ in checked] == ["w8a8-sq08", "w8a8-lm-head", "planted-broken"]
    assert checked[2][1].quantization.recipe == ROOT / "tests/data/broken-smoothing-recipe.yaml"
    assert s.search.objective == "smallest" and s.rollout.target == "none"


def test_the_load_enters_the_ledger_key_only_where_the_objective_measures_under_it():
    """A nightly search is a no-op when its definition is unchanged: the load a throughput
    search ranks by is part of that definition; for any other objective it is never used, and
    changing it must not redo (or, after an upgrade, re-publish) an existing search."""
    from requant.ledger import candidate_key

    def key(objective: str, requests: int) -> str:
        s = load_settings(DEMO, [THREE, f"search.objective={objective}",
                                 f"search.load.requests={requests}"])
        return candidate_key(s, {"model.safetensors": "abc"}, None, "r" * 64, "c")

    assert key("smallest", 64) == key("smallest", 16)
    assert key("throughput", 64) != key("throughput", 16)
    assert key("smallest", 64) != key("throughput", 64)
