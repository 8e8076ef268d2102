"""``kill -9`` of the promote flow after every step of a local rollout (requant.killpoints):
the real ``requant promote`` command against a real Prefect server and the real router under
supervisord. After each kill the endpoint answers (from the revision the step says), and the
next promote recovers: it ends serving the new revision, nothing pending, no fallback left on
the router, one model server running.

The subject is the rollout's orchestration, so the model servers are the stand-in
(tests/standin_vllm.py, through the worker's REQUANT_SERVING_PYTHON): about a second to start
instead of ~40 s, 15 starts here. The same rollout runs on real vLLM in test_rollout_local and
in the demo's end-to-end test.

One module-scoped endpoint; each step's test promotes the revision that is not serving, so the
steps alternate between two revisions of the tiny model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from requant.killpoints import ENV, LOCAL_ROLLOUT
from requant.processes import pid_running
from requant.profile import load_file
from requant.rollout.local import router_status, shutdown_local
from requant.rollout.state import DeployState, load_state
from requant.serving.router import REVISION_HEADER
from requant.serving.server import free_port
from tests.conftest import processes_mentioning, tiny_server_settings
from tests.standin_vllm import standin_python

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
REQUANT = shutil.which("requant") or str(Path(os.sys.executable).parent / "requant")
SWITCHED = LOCAL_ROLLOUT.index("switched")


@dataclass
class Endpoint:
    config: Path
    url: str
    state_dir: Path
    revisions: dict[str, Path]  # the two checkpoints, by the name the test gives them
    serving_python: Path  # the worker's REQUANT_SERVING_PYTHON: the stand-in
    serving: str = ""

    def promote(self, name: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
        from prefect.settings import PREFECT_API_URL

        env = {k: v for k, v in os.environ.items() if k != ENV}
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the test's server
        env["REQUANT_SERVING_PYTHON"] = str(self.serving_python)
        if kill_at:
            env[ENV] = kill_at
        return subprocess.run(
            [REQUANT, "promote", "--config", str(self.config), "--checkpoint",
             str(self.revisions[name]), "--force"],
            capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)

    def state(self) -> DeployState:
        return load_state(self.state_dir, "local")

    def answer(self) -> str:
        """The checkpoint folder name of the revision that answered a chat request."""
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-chat", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["choices"], r.text[:500]
        revision = r.headers[REVISION_HEADER]
        active = self.state()
        named = {d.release.revision: Path(d.release.checkpoint).name
                 for d in (active.active, active.previous, active.pending) if d}
        return named[revision]

    def vllm_servers(self) -> list[int]:
        """The model servers serving either checkpoint, by process group: a server's keeper
        (the recorded pid) leads the group its vLLM runs in."""
        return sorted({os.getpgid(p.pid)
                       for p in processes_mentioning(str(self.config.parent / "models"))
                       if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())})


@pytest.fixture(scope="module")
def endpoint(prefect_server, vllm_tiny_source, tmp_path_factory):
    work = tmp_path_factory.mktemp("kill-points")
    revisions = {}
    for name in ("rev-a", "rev-b"):  # same weights, different bytes: two releases
        revisions[name] = work / "models" / name
        shutil.copytree(vllm_tiny_source, revisions[name])
        (revisions[name] / "REVISION").write_text(name)
    config = work / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"),
        "rollout": {
            "target": "local", "served_model_name": "tiny-chat",
            "state_dir": str(work / "state"),
            "local": {"port": free_port(), "drain_timeout_s": 30, "keep_previous_s": 3,
                      "server": tiny_server_settings().model_dump(mode="json")},
            "slo": {"requests": 8, "concurrency": 4, "max_tokens": 16,
                    "max_p95_latency_s": 120}},
        # the worker's profile offers the two checkpoints to promote
        "allow": {"checkpoints": [str(work / "models")]}}))
    settings = load_file(config).settings
    ep = Endpoint(config, f"http://127.0.0.1:{settings.rollout.local.port}",
                  work / "state", revisions, standin_python(work / "serving-env" / "bin"))
    try:
        first = ep.promote("rev-a")
        assert first.returncode == 0, first.stderr[-3000:]
        ep.serving = "rev-a"
        yield ep
    finally:
        shutdown_local(settings)
    assert processes_mentioning(str(work)) == []


def left_by_the_kill(ep: Endpoint, step: str, old: str, new: str) -> int:
    """The kill happened at ``step`` and nowhere else: the record and the router say so.
    Returns the new server's pid."""
    state, router = ep.state(), router_status(ep.url)
    assert router is not None, "the router must still answer its status"
    recorded_new = LOCAL_ROLLOUT.index(step) > SWITCHED
    current = state.active if recorded_new else state.pending
    assert current is not None and Path(current.release.checkpoint).name == new
    assert pid_running(int(current.server["pid"]))  # the new server outlives the killed flow
    assert (state.pending is None) == recorded_new
    assert (router["backend"] == current.server["url"]) == (LOCAL_ROLLOUT.index(step) >= SWITCHED)
    assert bool(router["fallback"]) == (step in ("switched", "recorded"))
    previous = state.previous if recorded_new else state.active
    assert previous is not None and Path(previous.release.checkpoint).name == old
    assert pid_running(int(previous.server["pid"]))  # nothing stopped the old one yet
    return int(current.server["pid"])


@pytest.mark.parametrize("step", LOCAL_ROLLOUT)
def test_promote_killed_after_each_rollout_step_leaves_a_serving_endpoint_and_recovers(
        endpoint, step):
    ep = endpoint
    old = ep.serving
    new = "rev-b" if old == "rev-a" else "rev-a"

    killed = ep.promote(new, kill_at=step)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    started = left_by_the_kill(ep, step, old, new)
    switched = LOCAL_ROLLOUT.index(step) >= SWITCHED
    assert ep.answer() == (new if switched else old)

    rerun = ep.promote(new)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    state, router = ep.state(), router_status(ep.url)
    assert state.pending is None and Path(state.active.release.checkpoint).name == new
    assert Path(state.previous.release.checkpoint).name == old
    assert router["backend"] == state.active.server["url"] and router["fallback"] is None
    assert ep.vllm_servers() == [int(state.active.server["pid"])]
    # once switched to, the killed run's server is kept (it served); before, it was reaped
    assert (int(state.active.server["pid"]) == started) == switched
    assert ep.answer() == new
    ep.serving = new
