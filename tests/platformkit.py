"""A Prefect platform as a team runs it, for the slow tests: `prefect server start` (SQLite, or
a real PostgreSQL), the project applied by scripts/prefect_apply.sh, and a process worker per
pool. Used by test_prefect_platform.py."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from requant.serving.server import free_port
from tests.conftest import ROOT, wait_until

PREFECT = str(Path(sys.executable).parent / "prefect")
TOKEN = "hf_platformTESTsecret0123456789"


@dataclass
class Platform:
    url: str
    env: dict[str, str]
    home: Path
    database_url: str | None = None  # PostgreSQL's, when the server runs on it

    def client_settings(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: f"{self.url}/api"})


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def running_platform(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[Platform]:
    """Server + applied project + two workers; everything is stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "REQUANT_PROJECT_DIR": str(ROOT),
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", **(extra_env or {})}
    procs = []
    server_log = (home / "server.log").open("wb")
    procs.append(subprocess.Popen([PREFECT, "server", "start"], env=env, cwd=home,
                                  stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        applied = subprocess.run(["bash", "scripts/prefect_apply.sh"], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        assert applied.returncode == 0, applied.stdout[-3000:] + applied.stderr[-3000:]
        for pool in ("requant-gpu", "requant-serving"):
            log = (home / f"worker-{pool}.log").open("wb")
            procs.append(subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        yield Platform(url, env, home)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def wait_final(flow_run_id, timeout_s: float):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return wait_until(lambda: (run := client.read_flow_run(flow_run_id)).state
                          and run.state.is_final() and run, timeout_s,
                          f"flow run {flow_run_id} in a final state", every_s=2)


def wait_events(client, prefix: str, match, timeout_s: float = 60) -> list[dict]:
    """Events the server stores a few seconds after a run emits them (its event persister
    flushes in batches): poll until one matches, and fail at the deadline."""
    from prefect.events.filters import EventFilter, EventNameFilter

    body = {"filter": EventFilter(event=EventNameFilter(prefix=[prefix])).model_dump(mode="json")}

    def matched() -> list[dict] | None:
        events = client.request("POST", "/events/filter", json=body).json()["events"]
        return events if any(match(e) for e in events) else None

    return wait_until(matched, timeout_s, f"a {prefix}* event that matches", every_s=1)


@contextlib.contextmanager
def worker_profile(settings: dict) -> Iterator[str]:
    """``settings`` installed as a profile on this host's workers (the checkout's
    deployments/configs, where a flow run finds profiles by name) while the block runs; its
    name is what a run request names."""
    name = f"test-{secrets.token_hex(4)}"
    path = ROOT / "deployments" / "configs" / f"{name}.yaml"
    path.write_text(json.dumps(settings))
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)


class WebhookListener:
    """A chat webhook on this host: it records every JSON body POSTed to its secret path and
    answers 404 elsewhere, as a real one refuses a wrong URL."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(12)
        self.received: list[dict] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != f"/hooks/{listener.secret}":
                    self.send_response(404)
                else:
                    listener.received.append(json.loads(body or b"{}"))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{self.secret}"

    def __enter__(self) -> WebhookListener:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, match, timeout_s: float) -> dict:
        try:
            return wait_until(lambda: next((m for m in self.received if match(m)), None),
                              timeout_s, "a matching notification", every_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; received: {self.received[-5:]}") from None
