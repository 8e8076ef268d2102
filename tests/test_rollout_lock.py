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
