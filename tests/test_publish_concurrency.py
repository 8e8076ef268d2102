# ruff: noqa: F401, F811  (pytest injects the `candidate` fixture imported from test_publish)
"""Publishing under concurrency and kill -9, with separate processes against the test Hub: one
commit per candidate, every run that publishes it succeeds, and a run killed between commit and
tag is finished by the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.fakehub import FakeHub
from tests.test_publish import REPO, TOKEN, candidate


@pytest.fixture
def hub(tmp_path):
    with FakeHub(TOKEN, tmp_path / "hub-storage") as server:
        yield server


def job_file(hub, candidate, tmp_path, name: str):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "repo_id": REPO, "endpoint": hub.endpoint, "out": str(tmp_path / name),
        "checkpoint": str(candidate["checkpoint"]), "eval_dir": str(candidate["eval_dir"]),
        "gate_dir": str(candidate["gate_dir"]), "manifest": candidate["manifest"],
        "gate": candidate["gate"]}))
    return path


def start(job) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.publish_worker", str(job)], cwd=ROOT,
                            env=os.environ | {"HF_TOKEN": TOKEN}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_concurrent_publishes_of_one_candidate_make_one_commit_and_both_succeed(
        hub, candidate, tmp_path):
    hub.state.barrier("commit", 2)  # both reach the commit before either lands: a real race
    procs = [start(job_file(hub, candidate, tmp_path, name)) for name in ("a", "b")]
    results = [finish(p) for p in procs]
    repo = hub.state.repos[REPO]
    assert hub.state.commit_count(REPO) == 1
    assert {r["commit_sha"] for r in results} == {repo.branches["main"]}
    assert {r["tag"] for r in results} == set(repo.tags) and len(repo.tags) == 1
    # the loser was refused with 412 (parent moved), then adopted the winner's commit
    assert len([c for c in hub.state.calls if "/commit/" in c[1]]) == 2


def test_kill_9_between_commit_and_tag_is_finished_by_the_rerun_without_a_second_commit(
        hub, candidate, tmp_path):
    hold = hub.state.hold("create-tag", serve=False)  # the tag request never takes effect
    proc = start(job_file(hub, candidate, tmp_path, "killed"))
    try:
        assert hold.reached.wait(120), "the publish never reached create_tag"
        os.kill(proc.pid, signal.SIGKILL)  # committed, not tagged
        proc.wait(30)
    finally:
        hold.released.set()
    repo = hub.state.repos[REPO]
    assert hub.state.commit_count(REPO) == 1 and repo.tags == {}
    committed = repo.branches["main"]

    result = finish(start(job_file(hub, candidate, tmp_path, "rerun")))
    assert hub.state.commit_count(REPO) == 1
    assert result["commit_sha"] == committed and repo.tags == {result["tag"]: committed}
    assert (tmp_path / "rerun" / "publish.json").is_file()
    assert not (tmp_path / "killed").exists()  # the killed run wrote no record
