"""Which Prefect API the CLI's commands talk to, and one line when it cannot be reached
(requant/prefect_api.py, requant.errors.explain): the project's server when `make prefect-up`
started it, never an address from anywhere but this host's record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from requant.errors import EXIT_REFUSED, explain
from requant.prefect_api import choose_api
from requant.serving.server import free_port

REQUANT = str(Path(sys.executable).parent / "requant")


@pytest.mark.usefixtures("prefect_server")
def test_the_cli_uses_the_projects_server_recorded_by_prefect_up_when_it_answers(
        tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value().rstrip("/")
    record = tmp_path / "api-url"
    record.write_text(f"{url}\n")  # as scripts/prefect_server.sh start writes it
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    line = choose_api(record)
    assert os.environ["PREFECT_API_URL"] == url
    assert line == f"Prefect API: the project's server, {url.removesuffix('/api')} (UI)"


@pytest.mark.parametrize("recorded", [
    "http://127.0.0.1:{dead}/api",          # the server was stopped without prefect-down
    "http://prefect.example.com:4200/api",  # never another host from a file in the checkout
    "not a url",
])
def test_without_an_answering_project_server_the_cli_says_how_to_get_one(
        tmp_path, monkeypatch, recorded):
    record = tmp_path / "api-url"
    record.write_text(recorded.format(dead=free_port()))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    line = choose_api(record)
    assert "PREFECT_API_URL" not in os.environ
    assert "temporary server" in line and "make prefect-up" in line


def test_an_operator_set_prefect_api_url_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    (tmp_path / "api-url").write_text("http://127.0.0.1:2/api")
    assert choose_api(tmp_path / "api-url") == \
        "Prefect API: http://127.0.0.1:1/api (PREFECT_API_URL)"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:1/api"


def test_promote_against_an_unreachable_prefect_api_is_one_line_and_runs_nothing(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    done = subprocess.run([REQUANT, "promote", "--rollback"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == EXIT_REFUSED
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [errors[0]] and errors[0].startswith(
        f"error: cannot reach the Prefect API at {env['PREFECT_API_URL']}")
    assert "make prefect-up" in errors[0] and "Traceback (" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no state, lock or run folder: nothing started


def test_a_temporary_server_that_does_not_start_in_time_is_one_line():
    # Prefect's own message when its ephemeral server times out on a busy host (#39)
    code, message = explain(RuntimeError(
        "Timed out while attempting to connect to ephemeral Prefect API server."))
    assert code == EXIT_REFUSED and "did not start in time" in message
    assert "make prefect-up" in message
