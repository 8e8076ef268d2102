"""The platform as a team runs it past one machine: a real Prefect server (`prefect server
start`) on a real PostgreSQL (Debian's server, a throw-away cluster), the project applied by its
one command (pools, concurrency limit, deployments, automation from prefect.yaml), real process
workers on both pools, and the UI driven by headless Chromium. The rows are read back from
PostgreSQL itself. (The embedded SQLite server is what `make demo` runs: test_e2e_demo.)

Slow: a database, a server, two workers, and flow runs that start real vLLM servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from requant.profile import load_file
from requant.rollout.local import router_status, shutdown_local
from requant.serving.server import free_port
from requant.settings import PipelineSettings
from tests.conftest import (
    ROOT,
    needs_vllm,
    processes_mentioning,
    tiny_server_settings,
    tiny_settings,
)
from tests.fakehub import FakeHub
from tests.pgserver import pg_bin, postgres_server
from tests.platformkit import (
    TOKEN,
    WebhookListener,
    running_platform,
    wait_events,
    wait_final,
    worker_profile,
)

pytestmark = [pytest.mark.slow, needs_vllm,
              pytest.mark.skipif(pg_bin() is None, reason="scripts/setup_system.sh installs "
                                 "PostgreSQL")]

ARTIFACTS = Path(os.environ.get("REQUANT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def team_hub(tmp_path_factory):
    """The Hub the workers' operator configured (their HF_ENDPOINT): runs name no endpoint."""
    with FakeHub(TOKEN, tmp_path_factory.mktemp("hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def team_webhook():
    """The team's chat webhook (its URL carries a secret, as Slack's do)."""
    with WebhookListener() as hook:
        yield hook


@pytest.fixture(scope="module")
def platform(tmp_path_factory, team_hub, team_webhook):
    # PostgreSQL runs as its own user: its folder must not sit under pytest's root-only tmp.
    root = Path(tempfile.mkdtemp(prefix="requant-pg-"))
    root.chmod(0o755)  # mkdtemp makes it root-only; the cluster's own folder is the private one
    try:
        with postgres_server(root / "cluster") as url, running_platform(
                tmp_path_factory.mktemp("prefect-home"),
                {"HF_ENDPOINT": team_hub.endpoint,
                 "PREFECT_API_DATABASE_CONNECTION_URL": url,
                 # the operator's environment where make prefect-apply runs
                 "REQUANT_NOTIFY_WEBHOOK_URL": team_webhook.url}) as running:
            running.database_url = url
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def psql(url: str, sql: str) -> str:
    host_port, database = url.split("@", 1)[1].split("/", 1)
    host, port = host_port.split(":")
    return subprocess.run([str(pg_bin() / "psql"), "-h", host, "-p", port, "-U", "prefect",
                           "-d", database, "-At", "-c", sql], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_apply_registers_the_nightly_schedule_with_its_cron_and_timezone(platform):
    from prefect.client.orchestration import get_client

    with platform.client_settings(), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("requantize/requantize-nightly")
        (schedule,) = nightly.schedules
        assert schedule.schedule.cron == "0 2 * * *"
        assert schedule.schedule.timezone == "Europe/Berlin"
        assert schedule.active is True
        assert nightly.work_pool_name == "requant-gpu"
        pool = client.read_work_pool("requant-gpu")
        assert pool.concurrency_limit == 1
        limit = client.read_global_concurrency_limit_by_name("requant-gpu")
        assert limit.limit == 1
        automations = client.read_automations_by_name("promote__automation_1")
        assert len(automations) == 1 and automations[0].enabled


def test_on_demand_run_via_worker_passes_gate_and_the_automation_promotes_it(
        platform, team_hub, vllm_tiny_source, tmp_path):
    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment

    port = free_port()
    rollout = {"target": "local", "trigger": "automation", "served_model_name": "tiny-chat",
               "state_dir": str(tmp_path / "state"),
               "local": {"port": port, "keep_previous_s": 3,
                         "server": tiny_server_settings().model_dump(mode="json")},
               "slo": {"requests": 16, "concurrency": 8, "max_tokens": 16}}
    hub = team_hub
    with platform.client_settings():
        params = tiny_settings(tmp_path, vllm_tiny_source, rollout=rollout,
                               hub={"repo_id": "acme/platform"})
        settings = PipelineSettings.model_validate(params)
        profiles = contextlib.ExitStack()
        try:
            profile = profiles.enter_context(worker_profile(params))
            started = run_deployment("requantize/requantize",
                                     parameters={"request": {"profile": profile}}, timeout=0)
            run = wait_final(started.id, 900)
            assert run.state.is_completed(), run.state
            summary = json.loads((tmp_path / "runs" / str(run.id) / "summary.json").read_text())
            sha = summary["publish"]["commit_sha"]
            assert summary["rollout"] == {"trigger": "automation",
                                          "event": "requant.gate.passed"}

            deadline = time.monotonic() + 600
            promote_run = None
            with get_client(sync_client=True) as client:
                while promote_run is None:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["promote"])))
                    promote_run = next((r for r in runs
                                        if r.parameters.get("revision") == sha), None)
                    assert time.monotonic() < deadline, "the automation never ran promote"
                    time.sleep(2)
            promote_run = wait_final(promote_run.id, 600)
            assert promote_run.state.is_completed(), promote_run.state
            assert promote_run.parameters["request"]["profile"] == profile  # never settings
            assert router_status(f"http://127.0.0.1:{port}")["revision"] == sha
            refs = HfApi(endpoint=hub.endpoint, token=TOKEN).list_repo_refs("acme/platform")
            assert {b.name: b.target_commit for b in refs.branches}["production"] == sha
            assert TOKEN not in json.dumps(promote_run.parameters)
        finally:
            shutdown_local(settings)
            profiles.close()
    assert processes_mentioning(str(tmp_path / "state")) == []


def deployment_runs(deployment_id) -> set:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return {r.id for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))}


def ui_created_run(deployment_id, before: set, timeout_s: float = 60):
    """The flow run the form submitted (the UI returns to the deployment page)."""
    deadline = time.monotonic() + timeout_s
    while True:
        new = deployment_runs(deployment_id) - before
        if new:
            (run_id,) = new
            return run_id
        assert time.monotonic() < deadline, "the UI created no flow run"
        time.sleep(1)


def running_progress(run_id) -> dict[str, float]:
    """key -> percent of the run's progress artifacts, read while the run is not final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        if client.read_flow_run(run_id).state.is_final():
            return {}
        return {a.key: float(a.data) for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            if a.type == "progress"}


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_ui_custom_run_with_a_changed_parameter_completes_showing_progress(
        platform, vllm_tiny_source, tmp_path):
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    # evaluation on (two real vLLM servers): the run lasts long enough to be watched in the UI
    params = tiny_settings(tmp_path, vllm_tiny_source, rollout={"target": "none"})
    profiles = contextlib.ExitStack()
    profile = profiles.enter_context(worker_profile(params))
    with platform.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("requantize/requantize")
        # a platform team's test environment: the on-demand form defaults to a tiny model's
        # profile on the worker
        client.update_deployment(deployment.id, DeploymentUpdate(
            parameters={"request": {"profile": profile}}))
        before = deployment_runs(deployment.id)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{platform.url}/deployments", wait_until="networkidle")
            page.locator("a.deployment-list__name", has_text="requantize") \
                .filter(has_not_text="nightly").first.click()
            page.wait_for_url("**/deployments/deployment/*")
            page.goto(page.url + "/run", wait_until="networkidle")
            page.get_by_text("Num Samples").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ui-run-form.png"), full_page=True)
            field = page.locator("div.schema-form-property", has=page.locator(
                "span.schema-form-property__label", has_text="Num Samples")).last
            # unset by default (the profile's value): the form's "int | None" switch to int
            field.get_by_role("button", name="int", exact=True).click()
            field.locator("input[type=number]").fill("6")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url(f"**/deployments/deployment/{deployment.id}*", timeout=60_000)
            with platform.client_settings():
                run_id = ui_created_run(deployment.id, before)
                deadline = time.monotonic() + 600
                while "requant-progress-quantization" not in (during := running_progress(run_id)):
                    assert time.monotonic() < deadline, "no progress artifact while running"
                    time.sleep(0.5)
                page.goto(f"{platform.url}/runs/flow-run/{run_id}", wait_until="networkidle")
                page.get_by_text("Artifacts", exact=True).first.click()  # the run's tab
                page.get_by_text("requant-progress-quantization").first.wait_for(timeout=30_000)
                page.screenshot(path=str(ARTIFACTS / "ui-progress-during-run.png"), full_page=True)
                still_running = running_progress(run_id)  # {} once the run is final
                run = wait_final(run_id, 900)
            page.goto(f"{platform.url}/runs/flow-run/{run.id}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ui-custom-run-completed.png"), full_page=True)
        finally:
            browser.close()
    assert run.state.is_completed(), run.state
    profiles.close()
    assert run.parameters["request"]["calibration"]["num_samples"] == 6  # the changed field
    assert set(run.parameters) == {"request"}  # the form is the run request, nothing else
    assert_recorded_in_postgresql(platform, run.id)
    assert run.deployment_id == deployment.id
    summary = json.loads((tmp_path / "runs" / str(run.id) / "summary.json").read_text())
    assert summary["calibration"]["stats"]["samples"] == 6
    assert (ARTIFACTS / "ui-custom-run-completed.png").stat().st_size > 10_000
    # the progress bar was on screen while the run was going
    assert during and still_running, "the run ended before the UI showed its progress"
    assert (ARTIFACTS / "ui-progress-during-run.png").stat().st_size > 10_000


def assert_recorded_in_postgresql(platform, run_id) -> None:
    """The run, its artifacts and its gate event through the API, and the rows in PostgreSQL
    itself, not in a SQLite file next to the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with platform.client_settings(), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        events = wait_events(client, "requant.gate.",
                             lambda e: e["payload"].get("run_id") == str(run_id))
    keys = {a.key for a in artifacts}
    assert {"requant-run-summary", "gate-decision", "calibration-stats",
            "requant-progress-quantization", "requant-progress-evaluation-candidate"} <= keys
    progress = next(a for a in artifacts if a.key == "requant-progress-quantization")
    assert progress.type == "progress" and progress.data == 100
    (passed,) = [e for e in events if e["payload"].get("run_id") == str(run_id)]
    assert passed["event"] == "requant.gate.passed"
    assert TOKEN not in json.dumps(events)
    url = platform.database_url
    assert psql(url, f"select state_type from flow_run where id = '{run_id}'") == "COMPLETED"
    assert int(psql(url, f"select count(*) from artifact where flow_run_id = '{run_id}'")) \
        >= len(keys)
    assert not list(platform.home.glob("*.db"))


def promote_cli(platform, config: Path, checkpoint: Path, serving_python: Path,
                kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`requant promote` as an operator types it, against the platform's server."""
    from requant.killpoints import ENV

    env = {**platform.env, "REQUANT_SERVING_PYTHON": str(serving_python)}
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run([str(Path(os.sys.executable).parent / "requant"), "promote",
                           "--config", str(config), "--checkpoint", str(checkpoint), "--force"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def promote_run_of(client, checkpoint: Path):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])))
    (run,) = [r for r in runs if r.parameters.get("checkpoint") == str(checkpoint)]
    return run


def test_a_killed_run_is_marked_crashed_and_the_team_is_told_as_of_a_failed_gate(
        platform, team_webhook, tmp_path):
    """kill -9 of a run (no final state is ever sent): the automation `make prefect-apply`
    made marks it Crashed from its missing heartbeats, and the team's webhook hears of it; a
    run that completed stays Completed; a failed gate is told too. The subject is Prefect's
    side, so the model server is the stand-in."""
    from prefect.client.orchestration import get_client

    from requant.alerts import HEARTBEAT_S, SILENT_AFTER_S
    from tests.standin_vllm import standin_python

    models = {}
    for name in ("done", "killed"):
        models[name] = tmp_path / name
        models[name].mkdir()
        (models[name] / "config.json").write_text(json.dumps({"name": name}))
    config = tmp_path / "settings.yaml"
    config.write_text(json.dumps({"rollout": {
        "target": "local", "served_model_name": "tiny-chat", "state_dir": str(tmp_path / "st"),
        "local": {"port": free_port(), "keep_previous_s": 0, "drain_timeout_s": 5,
                  "server": {"startup_timeout_s": 60, "stop_grace_s": 2}},
        "slo": {"requests": 4, "concurrency": 2, "max_tokens": 4}},
        "allow": {"checkpoints": [str(tmp_path)]}}))  # the operator's: where promotes come from
    serving = standin_python(tmp_path / "env" / "bin")
    try:
        done = promote_cli(platform, config, models["done"], serving)
        assert done.returncode == 0, done.stderr[-2000:]
        killed = promote_cli(platform, config, models["killed"], serving, kill_at="spawned")
        assert killed.returncode == -9, killed.stderr[-2000:]
        with platform.client_settings(), get_client(sync_client=True) as client:
            run = promote_run_of(client, models["killed"])
            assert run.state.is_running()  # what the UI showed forever before the automation
            deadline = time.monotonic() + SILENT_AFTER_S + HEARTBEAT_S + 60
            while not (run := client.read_flow_run(run.id)).state.is_crashed():
                assert time.monotonic() < deadline, f"still {run.state.name}"
                time.sleep(2)
            assert "No heartbeat" in run.state.message
            completed = promote_run_of(client, models["done"])
            assert completed.state.is_completed()  # its heartbeats ended with a final state
            block = client.read_block_document_by_name("requant-team-webhook", "custom-webhook",
                                                       include_secrets=False)
        told = team_webhook.wait(lambda m: run.name in m.get("text", ""), 60)
        assert "promote" in told["text"] and "Crashed" in told["text"]
        assert team_webhook.secret not in json.dumps(block.model_dump(mode="json"))
        emit_failed_gate(platform, "run-that-failed")
        gate = team_webhook.wait(lambda m: "run-that-failed" in m.get("text", ""), 60)
        assert "gate failed" in gate["text"] and "nothing was published" in gate["text"]
    finally:
        shutdown_local(load_file(config).settings)
    assert processes_mentioning(str(tmp_path)) == []


def emit_failed_gate(platform, run_id: str) -> None:
    """The event the requantize flow emits when its gate fails (flows/requantize.py), sent
    by its own function from a process of its own, as a run would."""
    script = (
        "import sys; sys.path.insert(0, '.')\n"
        "from flows.requantize import emit_gate_event\n"
        "from prefect.events.worker import EventsWorker\n"
        "from requant.run_request import RunRequest\n"
        "from requant.settings import PipelineSettings\n"
        "s = PipelineSettings()\n"
        f"summary = {{'run_id': {run_id!r}, 'source': {{'model': s.source.model}},\n"
        "           'publish': None, 'gate': {'status': 'fail', 'rules': [{'recovery': 0.9}]}}\n"
        "emit_gate_event(s, RunRequest(), summary, passed=False)\n"
        "EventsWorker.drain_all()\n")
    done = subprocess.run([os.sys.executable, "-c", script], env=platform.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
