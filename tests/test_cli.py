"""The `requant` console script: every subcommand, its exit codes, and what it refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from requant.cli import main
from requant.errors import EXIT_BAD_INPUT
from requant.rollout.state import Deployed, DeployState, Release, save_state
from requant.rundir import MARKER
from requant.runs import prune_candidates
from requant.settings import PipelineSettings
from requant.status import collect_status

ROOT = Path(__file__).resolve().parents[1]
REQUANT = shutil.which("requant") or str(Path(os.sys.executable).parent / "requant")


def settings_for(tmp_path: Path, **sections) -> list[str]:
    """``--config`` of an operator's profile with this test's folders (and ``sections``)."""
    data = {"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
            "rollout": {"state_dir": str(tmp_path / "state"), "local": {"port": 1}}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_of(data, tmp_path)


def config_of(settings: PipelineSettings | dict, folder: Path) -> list[str]:
    data = settings if isinstance(settings, dict) else settings.model_dump(mode="json")
    path = folder / "profile.yaml"
    path.write_text(json.dumps(data))
    return ["--config", str(path)]


def test_console_script_help_lists_every_operator_command():
    out = subprocess.run([REQUANT, "--help"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    for command in ("run", "promote", "status", "down", "runs", "noise", "settings-schema"):
        assert f"    {command}" in out
    assert "2  bad input" in out and "1  refused" in out


def test_settings_schema_is_the_json_schema_the_error_hint_points_to(capsys):
    assert main(["settings-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"source", "calibration", "quantization", "gate", "rollout"} <= set(schema["properties"])
    assert schema["$defs"]["CalibrationSettings"]["properties"]["num_samples"]["exclusiveMinimum"] == 0


def test_bad_settings_exit_2_naming_the_field_for_every_command_that_reads_them(tmp_path, capsys):
    for argv in (["run"], ["status"], ["down"], ["runs", "prune", "--keep", "1"],
                 ["promote", "--rollback"], ["noise"]):  # refused before Prefect or a model
        assert main([*argv, "--set", "calibration.max_seq_len=0"]) == EXIT_BAD_INPUT
        assert "calibration.max_seq_len" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_noise_for_a_stage_the_gate_does_not_have_is_bad_input_before_any_server(tmp_path,
                                                                                  capsys):
    assert main(["noise", "--stages", "3", *settings_for(tmp_path)]) == EXIT_BAD_INPUT
    assert "--stages: the gate has 2 stage(s); choose 1 to 2." in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_prune_without_a_rule_is_bad_input(tmp_path, capsys):
    assert main(["runs", "prune", *settings_for(tmp_path)]) == EXIT_BAD_INPUT
    assert "--keep N or --older-than" in capsys.readouterr().err


def test_promote_rollback_with_no_previous_revision_is_bad_input_not_a_crash(tmp_path):
    # a subprocess: the promote flow starts Prefect, whose log handlers keep the stream they
    # found (pytest's capture would be closed under them)
    proc = subprocess.run([REQUANT, "promote", "--rollback", *settings_for(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "no previous revision" in proc.stderr


def test_promote_of_a_branch_name_is_one_line_before_prefect_starts(tmp_path):
    proc = subprocess.run([REQUANT, "promote", "--revision", "main", *settings_for(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line == ("error: revision: 'main' is not a 40-character commit SHA. Deploy commits, "
                    "never branch names (they move).")
    assert "Prefect API" not in proc.stderr  # refused before any Prefect call


def make_run(root: Path, run_id: str, age_s: float, gate: str = "pass") -> Path:
    run = root / run_id
    (run / "checkpoint").mkdir(parents=True)
    (run / MARKER).write_text(run_id)  # a folder requant made for a run
    (run / "checkpoint" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({
        "run_id": run_id, "gate": {"status": gate, "promote": gate == "pass"},
        "publish": {"dry_run": True}}))
    then = time.time() - age_s
    os.utime(run, (then, then))
    return run


def deploy(settings: PipelineSettings, active: Path, previous: Path | None) -> None:
    def d(path: Path) -> Deployed:
        return Deployed(Release(f"local-{path.parent.name}", checkpoint=str(path)), "2026-11-25",
                        None, "http://127.0.0.1:1", {"pid": 999_999_999})
    save_state(settings.rollout.state_dir, DeployState(
        "local", active=d(active), previous=d(previous) if previous else None))


def test_prune_keeps_the_newest_and_never_what_serves_or_its_rollback_target(tmp_path):
    s = PipelineSettings(output_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    s.rollout.state_dir = tmp_path / "state"
    runs = [make_run(s.output_dir, f"run-{i}", age_s=86400 * (10 - i)) for i in range(6)]
    deploy(s, runs[0] / "checkpoint", runs[1] / "checkpoint")  # the two oldest serve
    doomed = prune_candidates(s, keep_last=2, older_than_s=None)
    assert sorted(p.name for p in doomed) == ["run-2", "run-3"]
    assert main(["runs", "prune", "--keep", "2", *config_of(s, tmp_path)]) == 0
    assert sorted(p.name for p in s.output_dir.iterdir()) == ["run-0", "run-1", "run-4", "run-5"]


def test_prune_by_age_spares_the_last_published_run_and_cleans_old_caches(tmp_path):
    s = PipelineSettings(output_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    s.rollout.state_dir = tmp_path / "state"
    old = make_run(s.output_dir, "old", age_s=30 * 86400)
    published = make_run(s.output_dir, "published", age_s=40 * 86400)
    new = make_run(s.output_dir, "new", age_s=60)
    ledger = s.cache_dir / "ledger"
    ledger.mkdir(parents=True)
    (ledger / "k.json").write_text(json.dumps({
        "published_at": "2026-11-01T00:00:00+00:00", "run_id": "published",
        "checkpoint": str(published / "checkpoint")}))
    stale = s.cache_dir / "calibration" / "abc"
    stale.mkdir(parents=True)
    killed = s.cache_dir / "quantization-resume" / "def"  # a killed quantization's layers
    killed.mkdir(parents=True)
    then = time.time() - 30 * 86400
    os.utime(stale, (then, then))
    os.utime(killed, (then, then))
    doomed = prune_candidates(s, keep_last=None, older_than_s=14 * 86400)
    assert set(doomed) == {old.resolve(), stale.resolve(), killed.resolve()}
    assert new.exists() and published.exists()


def test_status_reports_target_serving_record_dead_router_and_recent_runs(tmp_path, capsys):
    s = PipelineSettings(output_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    s.rollout.state_dir = tmp_path / "state"
    s.rollout.local.port = 1  # nothing listens there: the router is reported down, not guessed
    run = make_run(s.output_dir, "run-a", age_s=10, gate="fail")
    deploy(s, run / "checkpoint", None)
    status = collect_status(s)
    assert status["serving"]["target"] == "local"
    assert status["serving"]["active"]["revision"] == "local-run-a"
    assert status["serving"]["router"]["alive"] is False
    assert status["serving"]["server"]["alive"] is False
    assert status["runs"][0] | {"path": None} == {
        "run_id": "run-a", "path": None, "state": "finished", "gate": "fail",
        "promote": False, "publish": "dry run"}
    assert main(["status", "--json", *config_of(s, tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["serving"]["active"]["revision"] == "local-run-a"


def test_down_on_a_target_with_nothing_running_succeeds(tmp_path, capsys):
    assert main(["down", *settings_for(tmp_path)]) == 0
    assert "stopped the local deployment" in capsys.readouterr().out


@pytest.mark.parametrize("text,seconds", [("14d", 14 * 86400), ("12h", 43200), ("90", 90.0)])
def test_prune_ages_accept_days_hours_and_seconds(text, seconds):
    from requant.runs import parse_age

    assert parse_age(text) == seconds


@pytest.mark.usefixtures("prefect_server")
def test_run_quantizes_through_the_flow_and_exits_0_printing_where_things_are(
        tiny_model, chat_file, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test's server
    proc = subprocess.run(
        [REQUANT, "run", *settings_for(tmp_path, source={"model": str(tiny_model)},
                                       calibration={"dataset": str(chat_file)},
                                       rollout={"target": "none"}),
         "--set", "calibration.num_samples=8", "--set", "calibration.max_seq_len=128",
         "--set", "evaluation.enabled=false"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"run directory: {run_dir}" in proc.stdout
    assert f"checkpoint: {run_dir / 'checkpoint'}" in proc.stdout
    assert "gate: not run" in proc.stdout  # evaluation off: said, and nothing published
    assert "[quantization] 100.0%" in proc.stderr  # the terminal progress line


def _hub_error(status: int):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://hub.example/api/models/acme/x/commit/main")
    return HfHubHTTPError(f"{status} Client Error", response=httpx.Response(status,
                                                                              request=request))


def _every_error():
    import errno

    from requant import errors
    from requant.evaluation.gate import GateDecision
    from requant.rollout.state import Release

    decision = GateDecision(status="fail", promote=False, reasons=["loss 0.1"],
                            rules=[], look=1, looks=1, questions=1, total=1)
    return [
        (errors.SettingsError("calibration.num_samples: too small. Set more."), 2),
        (errors.StateFileError("state.json: not valid JSON. Delete it."), 2),
        (errors.ServerError("vLLM died: log ..."), 1),
        (errors.CheckpointVerificationError("2 Linears not INT8"), 1),
        (errors.DeploymentCheckFailed("smoke", "empty answer"), 1),
        (errors.SmoothingNotExact("not exact: mapping at fault", {}), 1),
        (errors.QuantizationFailed("rank 1 died", rank=1), 1),
        (errors.GateFailed(decision), 1),
        (errors.RolloutFailed(Release(revision="a" * 40, repo_id="acme/x"), "load", "p95"), 1),
        (errors.PublishError("the Hub refused", 409), 1),
        (_hub_error(401), 2),
        (_hub_error(403), 2),
        (_hub_error(500), 1),
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"), 1),
    ]


@pytest.mark.parametrize("error,code", _every_error(), ids=lambda v: type(v).__name__
                         if isinstance(v, BaseException) else str(v))
def test_every_error_is_one_line_with_its_exit_code_and_a_traceback_only_with_debug(
        error, code, monkeypatch, capsys):
    import requant.cli as cli

    def fail(_args):
        raise error

    monkeypatch.setitem(cli.HANDLERS, "settings-schema", fail)
    assert main(["settings-schema"]) == code
    err = capsys.readouterr().err
    assert err.strip().startswith("error: ") and "Traceback" not in err and "--debug" in err
    if getattr(error, "filename", None):  # the full disk
        assert "no space left" in err and "Hub" not in err  # a full disk is not the network
    with pytest.raises(type(error)):
        main(["--debug", "settings-schema"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    import requant.cli as cli

    monkeypatch.setitem(cli.HANDLERS, "settings-schema", lambda _a: {}["missing"])
    with pytest.raises(KeyError):
        main(["settings-schema"])


@pytest.mark.parametrize("record", ["local/state.json", "../cache/ledger/0123abcd.json"])
def test_a_corrupt_state_file_makes_status_say_which_file_not_crash(tmp_path, capsys, record):
    path = tmp_path / "state" / record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"target": "local", "active": {')
    assert main(["status", *settings_for(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{path.name}: not valid JSON" in err and "Traceback" not in err


def test_promote_of_a_revision_the_hub_does_not_have_says_so(tmp_path):
    from huggingface_hub import HfApi

    from tests.fakehub import FakeHub

    with FakeHub("hf_writer", tmp_path / "hub") as hub:
        HfApi(endpoint=hub.endpoint, token="hf_writer").create_repo("acme/model")
        env = {**os.environ, "HF_TOKEN": "hf_writer", "HF_ENDPOINT": hub.endpoint}
        proc = subprocess.run([REQUANT, "promote",
                               *settings_for(tmp_path, hub={"repo_id": "acme/model"}),
                               "--revision", "c" * 40],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert f"revision: acme/model has no commit {'c' * 40}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_says_what_each_run_published_in_words():
    from requant.status import render_status, run_line

    def run(publish: dict | None, gate: str) -> dict:
        return run_line(f"r-{gate}", Path("runs"), {"gate": {"status": gate, "promote": True},
                                                     "publish": publish})

    text = render_status({"serving": {"target": "none"}, "last_published": None, "runs": [
        run({"commit_sha": "abc123"}, "pass"), run({"dry_run": True}, "pass"),
        run(None, "fail")]})
    assert "r-pass: finished gate pass, published abc123" in text
    assert "gate pass, published as a dry run" in text
    assert "r-fail: finished gate fail, nothing published" in text and "None" not in text


def test_status_of_a_failed_run_says_where_why_and_what_its_gate_and_search_said():
    from requant.status import render_status, run_line

    summary = {"gate": None, "publish": None,
               "search": {"winner": None, "objective": "order", "candidates": 1},
               "failure": {"error": "GateFailed", "where": "requantize.py:240 in search",
                           "message": "no candidate passed: bad-a: fail"}}
    text = render_status({"serving": {"target": "none"}, "last_published": None,
                          "runs": [run_line("r-x", Path("runs"), summary)]})
    assert ("r-x: FAILED: GateFailed at requantize.py:240 in search, gate fail, nothing "
            "published; search of 1 (order): winner none") in text
    assert "    why: no candidate passed: bad-a: fail" in text
