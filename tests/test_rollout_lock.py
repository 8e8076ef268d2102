"""One rollout per target: a second promote waits for the first, and a holder killed with
SIGKILL releases the target at once (the kernel drops its flock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from requant.rollout.lock import rollout_lock

pytestmark = pytest.mark.usefixtures("prefect_server")

HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600);"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)")


def test_a_second_rollout_waits_and_a_killed_holder_releases_the_target(tmp_path):
    lock_file = tmp_path / "local" / "rollout.lock"
    lock_file.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another rollout is running
        said: list[str] = []
        entered = threading.Event()

        def second_rollout() -> None:
            with rollout_lock(tmp_path, "local", said.append):
                entered.set()

        t = threading.Thread(target=second_rollout, daemon=True)
        t.start()
        assert not entered.wait(2), "entered while another rollout held the target"
        assert said and "waiting" in said[0]
        os.kill(holder.pid, signal.SIGKILL)  # the running rollout's process is killed
        assert entered.wait(20), "the target stayed locked after its holder died"
        t.join(5)
    finally:
        holder.kill()
        holder.wait(5)


def test_rollouts_of_different_targets_do_not_wait_for_each_other(tmp_path):
    with rollout_lock(tmp_path, "local"):
        started = time.monotonic()
        with rollout_lock(tmp_path, "kubernetes"):
            assert time.monotonic() - started < 10


def test_without_the_operators_limit_a_rollout_warns_nothing_and_with_it_holds_its_slot(
        tmp_path, caplog):
    """#39: the embedded default has no requant-rollout-<target> limit (prefect-apply makes
    it), so the flock alone serialises rollouts there, and the run log says nothing of a
    missing limit; where the operator made it, a rollout holds its one slot."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from requant.rollout.lock import limit_name

    name = limit_name("local")

    @flow
    def promote_like() -> int | None:
        with rollout_lock(tmp_path, "local"), get_client(sync_client=True) as client:
            try:
                return client.read_global_concurrency_limit_by_name(name).active_slots
            except ObjectNotFound:
                return None

    with caplog.at_level("WARNING"):
        assert promote_like() is None
    assert "do not exist" not in caplog.text
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
    try:
        assert promote_like() == 1
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)
