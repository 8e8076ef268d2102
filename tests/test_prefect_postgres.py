"""Past one machine: the Prefect server on a real PostgreSQL (Debian's server, a throw-away
cluster), the project applied, a deployment run by two process workers, and the run, its
artifacts and the gate event read back through the API, and the rows found in PostgreSQL itself.

Slow: a PostgreSQL cluster, a Prefect server, two workers and two real vLLM evaluations.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import needs_vllm
from tests.pgserver import pg_bin, postgres_server
from tests.platformkit import TOKEN, running_platform, tiny_settings, wait_events, wait_final

pytestmark = [pytest.mark.slow, needs_vllm,
              pytest.mark.skipif(pg_bin() is None, reason="scripts/setup_system.sh installs "
                                 "PostgreSQL")]


@pytest.fixture(scope="module")
def pg_platform(tmp_path_factory):
    # PostgreSQL runs as its own user: its folder must not sit under pytest's root-only tmp.
    root = Path(tempfile.mkdtemp(prefix="requant-pg-"))
    root.chmod(0o755)  # mkdtemp makes it root-only; the cluster's own folder is the private one
    try:
        with postgres_server(root / "cluster") as url, running_platform(
                tmp_path_factory.mktemp("prefect-pg-home"),
                {"PREFECT_API_DATABASE_CONNECTION_URL": url}) as platform:
            yield platform, url
    finally:
        shutil.rmtree(root, ignore_errors=True)


def psql(url: str, sql: str) -> str:
    host_port, database = url.split("@", 1)[1].split("/", 1)
    host, port = host_port.split(":")
    return subprocess.run([str(pg_bin() / "psql"), "-h", host, "-p", port, "-U", "prefect",
                           "-d", database, "-At", "-c", sql], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_deployment_run_by_workers_is_stored_in_postgresql_with_artifacts_and_gate_event(
        pg_platform, vllm_tiny_source, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    platform, url = pg_platform
    params = tiny_settings(tmp_path, vllm_tiny_source, rollout={"target": "none"})
    with platform.client_settings(), get_client(sync_client=True) as client:
        assert client.read_work_pool("requant-gpu").concurrency_limit == 1
        started = run_deployment("requantize/requantize", parameters={"settings": params},
                                 timeout=0)
        run = wait_final(started.id, 900)
        assert run.state.is_completed(), run.state
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        events = wait_events(client, "requant.gate.",
                             lambda e: e["payload"].get("run_id") == str(run.id))

    keys = {a.key for a in artifacts}
    assert {"requant-run-summary", "gate-decision", "calibration-stats",
            "requant-progress-quantization", "requant-progress-evaluation-candidate"} <= keys
    progress = next(a for a in artifacts if a.key == "requant-progress-quantization")
    assert progress.type == "progress" and progress.data == 100
    (passed,) = [e for e in events if e["payload"].get("run_id") == str(run.id)]
    assert passed["event"] == "requant.gate.passed"
    assert TOKEN not in json.dumps(events)
    # the rows really are in PostgreSQL, not in a SQLite file next to the server
    assert psql(url, f"select state_type from flow_run where id = '{run.id}'") == "COMPLETED"
    assert int(psql(url, f"select count(*) from artifact where flow_run_id = '{run.id}'")) \
        >= len(keys)
    assert not list(platform.home.glob("*.db"))
