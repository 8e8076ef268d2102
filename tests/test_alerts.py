"""requant's automations on a real Prefect server (the session's): what `requant automations`
(run by make prefect-apply) leaves there, through the function it calls. That they fire (a killed run marked Crashed, the
team's webhook told) is shown end to end in test_prefect_platform.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from requant.alerts import (
    CRASHED,
    FLOWS,
    GATE_FAILED,
    HEARTBEAT_S,
    RUN_FAILED,
    SILENT_AFTER_S,
    WEBHOOK_ENV,
    apply_automations,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("prefect_server")


def ours(client) -> dict[str, list]:
    named: dict[str, list] = {}
    for automation in client.read_automations():
        named.setdefault(automation.name, []).append(automation)
    return {n: a for n, a in named.items() if n in (CRASHED, RUN_FAILED, GATE_FAILED)}


def test_apply_twice_leaves_one_silent_run_automation_and_no_notifier_without_a_webhook(
        monkeypatch):
    from prefect.client.orchestration import get_client

    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    said: list[str] = []
    assert apply_automations(said.append) == [CRASHED]
    assert apply_automations(said.append) == [CRASHED]
    with get_client(sync_client=True) as client:
        found = ours(client)
    assert list(found) == [CRASHED] and len(found[CRASHED]) == 1
    trigger = found[CRASHED][0].trigger
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == SILENT_AFTER_S
    assert trigger.match_related.model_dump()["prefect.resource.name"] == list(FLOWS)
    assert f"no team notifications: {WEBHOOK_ENV} is not set" in said


def test_a_webhook_adds_both_notifiers_and_its_url_is_kept_secret(monkeypatch):
    from prefect.client.orchestration import get_client

    url = "https://hooks.example.invalid/services/T000/SECRETPATH123"
    monkeypatch.setenv(WEBHOOK_ENV, url)
    said: list[str] = []
    apply_automations(said.append)
    with get_client(sync_client=True) as client:
        found = ours(client)
        block = client.read_block_document_by_name("requant-team-webhook", "custom-webhook",
                                                   include_secrets=False)
        automations = [a.model_dump_json() for a in client.read_automations()]
    assert sorted(found) == sorted([CRASHED, RUN_FAILED, GATE_FAILED])
    assert all(len(v) == 1 for v in found.values())
    assert "SECRETPATH123" not in block.model_dump_json()
    assert not any("SECRETPATH123" in a for a in automations)
    assert not any("SECRETPATH123" in line for line in said)
    monkeypatch.delenv(WEBHOOK_ENV)  # unset again: the notifiers go, the crash marker stays
    apply_automations(said.append)
    with get_client(sync_client=True) as client:
        assert list(ours(client)) == [CRASHED]


def test_a_webhook_that_is_not_a_url_is_refused_with_exit_2_naming_the_variable():
    env = {**os.environ, WEBHOOK_ENV: "hooks.slack.com/services/T000"}
    done = subprocess.run([str(Path(sys.executable).parent / "requant"), "automations"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith(f"error: {WEBHOOK_ENV}: not an http(s) URL") and "Traceback (" not in err


def test_the_automations_watch_every_flow_the_project_defines_and_both_pools_beat():
    defined = set()
    for path in (ROOT / "flows").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "flow":
                defined |= {k.value.value for k in node.keywords if k.arg == "name"}
    assert defined == set(FLOWS)
    from requant.job_template import POOL_ENV, lock

    for template in sorted((ROOT / "deployments" / "work-pools").glob("*.json")):
        env = lock(json.loads(template.read_text()))["job_configuration"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S), template.name
    assert POOL_ENV["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    assert HEARTBEAT_S * 2 < SILENT_AFTER_S  # one late heartbeat is not a dead run
