"""Shadow and canary phases: the router copies live requests to a rollout's new revision and
compares its answers (thrown away), then sends it exactly its share of live requests; the
rollout judges each phase on the router's own metrics and rolls back at the first breach (5xx
share, disagreement, p95 latency, too little traffic to judge), and a rollout killed mid-phase
is finished by the next one.

The router is the real one (in-process for its API, under supervisord for rollouts); the model
servers are the stand-in (tests/standin_vllm.py), whose ``standin-faults.json`` makes a
checkpoint fail only on live clients' requests, as a canary exists to catch. Fast: about a
second per server start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from requant.errors import RolloutFailed
from requant.processes import pid_running
from requant.report import render_rollout
from requant.rollout.live_phases import (
    Pairs,
    Traffic,
    breach,
    parse_pairs,
    parse_traffic,
    shadow_breach,
)
from requant.rollout.local import rollout_local, router_status, shutdown_local
from requant.rollout.release import resolve_release
from requant.rollout.state import load_state
from requant.serving.router import REVISION_HEADER, create_app
from requant.serving.server import free_port
from requant.serving.shadow import Answer, outcome
from requant.settings import CanarySettings, PipelineSettings, ShadowSettings
from requant.status import collect_status, render_status
from tests.conftest import processes_mentioning
from tests.standin_vllm import standin_python
from tests.test_router_and_checks import ADMIN, TOKEN, TestClient, Upstream

LIVE = "LIVE-CLIENT"  # in every live request, in no smoke or load-test prompt


# ---- the router's split -----------------------------------------------------------------------


@pytest.fixture
def two_upstreams():
    a, b = Upstream("A"), Upstream("B")
    yield a, b
    a.close()
    b.close()


def test_the_canary_answers_exactly_its_weight_of_requests_evenly_spread(two_upstreams,
                                                                         tmp_path):
    a, b = two_upstreams
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        client.put("/-/backend", json={"url": a.url, "revision": "rev-a"}, headers=ADMIN)
        r = client.put("/-/canary", headers=ADMIN,
                       json={"url": b.url, "revision": "rev-b", "weight": 0.25})
        assert r.status_code == 200 and r.json()["canary"]["weight"] == 0.25
        answered = [client.get("/v1/models").json()["backend"] for _ in range(40)]
        assert answered.count("B") == 10  # exactly its share, not about it
        assert [i for i, name in enumerate(answered) if name == "B"] == list(range(3, 40, 4))
        page = client.get("/-/metrics").text
        weight = f'requant_router_canary_weight{{backend="{b.url}",revision="rev-b"}} 0.25'
        assert weight in page
        traffic = parse_traffic(page)  # what the rollout's judge reads
        assert (traffic["rev-a"].requests, traffic["rev-b"].requests) == (30, 10)
        assert traffic["rev-b"].errors == 0 and traffic["rev-b"].quantile(0.95) is not None

        assert client.delete("/-/canary", headers=ADMIN).json()["canary"] is None
        assert {client.get("/v1/models").json()["backend"] for _ in range(8)} == {"A"}
        assert "requant_router_canary_weight{" not in client.get("/-/metrics").text


def test_setting_a_canary_needs_the_token_a_well_formed_body_and_a_backend(two_upstreams,
                                                                           tmp_path):
    _, b = two_upstreams
    body = {"url": b.url, "revision": "rev-b", "weight": 0.1}
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        assert client.put("/-/canary", json=body).status_code == 401
        assert client.delete("/-/canary").status_code == 401
        conflict = client.put("/-/canary", json=body, headers=ADMIN)
        assert conflict.status_code == 409 and "active backend" in conflict.json()["error"]
        client.put("/-/backend", json={"url": b.url, "revision": "x"}, headers=ADMIN)
        for bad, field in (({**body, "weight": 1}, "body.weight"),
                           ({**body, "weight": 0}, "body.weight"),
                           ({**body, "weight": True}, "body.weight"),
                           ({**body, "url": "localhost:1"}, "body.url")):
            r = client.put("/-/canary", json=bad, headers=ADMIN)
            assert r.status_code == 400 and r.json()["error"].startswith(field)
    with TestClient(create_app(tmp_path / "r2.json", TOKEN), client=("10.0.0.7", 1)) as remote:
        assert remote.put("/-/canary", json=body, headers=ADMIN).status_code == 403


def test_a_restarted_router_keeps_the_canary_phase_and_a_switch_ends_it(two_upstreams,
                                                                       tmp_path):
    a, b = two_upstreams
    state = tmp_path / "router.json"
    with TestClient(create_app(state, TOKEN)) as client:
        client.put("/-/backend", json={"url": a.url, "revision": "rev-a"}, headers=ADMIN)
        client.put("/-/canary", json={"url": b.url, "revision": "rev-b", "weight": 0.5},
                   headers=ADMIN)
    with TestClient(create_app(state, TOKEN)) as client:
        assert client.get("/-/status").json()["canary"]["url"] == b.url
        assert sorted(client.get("/v1/models").json()["backend"] for _ in range(4)) == [
            "A", "A", "B", "B"]
        switched = client.put("/-/backend", json={"url": b.url, "revision": "rev-b"},
                              headers=ADMIN).json()
        assert switched["canary"] is None and switched["backend"] == b.url
    assert json.loads(state.read_text())["canary"] is None


def test_a_canary_that_does_not_answer_costs_no_request(two_upstreams, tmp_path):
    a, _ = two_upstreams
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        client.put("/-/backend", json={"url": a.url, "revision": "rev-a"}, headers=ADMIN)
        client.put("/-/canary", json={"url": "http://127.0.0.1:9", "revision": "rev-b",
                                      "weight": 0.5}, headers=ADMIN)
        answers = [client.get("/v1/models") for _ in range(10)]
        assert [r.status_code for r in answers] == [200] * 10
        assert {r.headers[REVISION_HEADER] for r in answers} == {"rev-a"}
        assert client.get("/-/status").json()["health"]["http://127.0.0.1:9"]["healthy"] is False


# ---- the judge ------------------------------------------------------------------------------


def traffic(requests: int, errors: int = 0, latency_s: float = 0.01) -> Traffic:
    """``requests`` answers, all taking ``latency_s``, on the router's buckets."""
    from requant.serving.metrics import LATENCY_BUCKETS

    bounds = [*LATENCY_BUCKETS, float("inf")]
    return Traffic(requests, errors, tuple((le, float(requests if latency_s <= le else 0))
                                           for le in bounds))


def test_quantile_interpolates_within_its_bucket_as_prometheus_does():
    t = Traffic(100, 0, ((0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)))
    assert t.quantile(0.5) == pytest.approx(0.1)
    assert t.quantile(0.95) == pytest.approx(0.75)  # halfway through (0.5, 1]: 95 of 90..100
    assert Traffic(4, 0, ((1.0, 0.0), (float("inf"), 4.0))).quantile(0.95) == 1.0
    assert Traffic().quantile(0.95) is None


def test_the_error_rule_holds_at_its_limit_and_breaks_just_above_it():
    cfg = CanarySettings(min_requests=100, max_error_rate_increase=0.02)
    serving = traffic(1000, errors=10)  # 1 %
    assert breach(traffic(100, errors=3), serving, cfg) is None  # 3 % = 1 % + 2 %: holds
    reason = breach(traffic(100, errors=4), serving, cfg)
    assert reason and "max_error_rate_increase" in reason and "4 of its 100" in reason
    assert breach(traffic(99, errors=99), serving, cfg) is None  # not judged below the minimum


def test_the_latency_rule_holds_at_its_ratio_and_breaks_above_it():
    cfg = CanarySettings(min_requests=10, max_p95_latency_ratio=2.0)
    serving = Traffic(10, 0, ((1.0, 10.0), (2.0, 10.0), (float("inf"), 10.0)))
    at = Traffic(10, 0, ((1.0, 0.0), (2.0, 10.0), (float("inf"), 10.0)))  # p95 1.95 s
    assert serving.quantile(0.95) == pytest.approx(0.95)
    assert breach(at, serving, cfg) is not None  # 1.95 > 2 x 0.95
    assert breach(at, serving, cfg.model_copy(update={"max_p95_latency_ratio": 2.06})) is None
    assert breach(at, serving, cfg.model_copy(update={"max_p95_latency_ratio": None})) is None
    assert breach(at, traffic(9, latency_s=0.01), cfg) is None  # the serving side too few


# ---- rollouts with canary phases (real router under supervisord, stand-in servers) ---------


class Clients:
    """Live traffic through the endpoint until stopped, from four clients at once: every
    answer's status and revision."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.answers, self.stopped = url, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopped.is_set():
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": "tiny-chat", "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": f"{LIVE} hello"}]})
                    self.answers.append((r.status_code, r.headers.get(REVISION_HEADER)))
                except httpx.HTTPError as exc:
                    self.answers.append((repr(exc), None))
                time.sleep(0.02)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(30)


def checkpoint(root: Path, name: str, faults: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    if faults:
        (folder / "standin-faults.json").write_text(json.dumps(faults))
    return folder


@pytest.fixture
def endpoint(tmp_path, monkeypatch):
    """Revision A serving behind the router, canary phases configured for the next rollout."""
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(tmp_path / "env" / "bin")))
    monkeypatch.setenv("STANDIN_STARTUP_S", "0.5")
    settings = PipelineSettings.model_validate({"rollout": {
        "target": "local", "served_model_name": "tiny-chat", "state_dir": str(tmp_path / "st"),
        "local": {"port": free_port(), "keep_previous_s": 0, "drain_timeout_s": 5,
                  "server": {"startup_timeout_s": 10, "stop_grace_s": 2},
                  "canary": {"phases": [{"weight": 0.5, "seconds": 2}], "min_requests": 5,
                             "poll_s": 0.2}},
        "slo": {"requests": 4, "concurrency": 2, "max_tokens": 4}}})
    first = resolve_release(settings, checkpoint=checkpoint(tmp_path, "a"))
    try:
        deployed, _ = rollout_local(settings, first, "run-a", log=lambda _m: None)
        assert deployed.verification["canary"] == []  # nothing served before: no canary
        yield settings, deployed, f"http://127.0.0.1:{settings.rollout.local.port}", tmp_path
    finally:
        shutdown_local(settings)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_canary_that_holds_is_switched_to_with_its_phases_on_record_and_in_status(endpoint):
    settings, a, url, root = endpoint
    b = resolve_release(settings, checkpoint=checkpoint(root, "b"))
    seen: list[str] = []

    def log(line: str) -> None:  # during the phase, what `requant status` shows
        if "answers 50% of live requests" in line:
            seen.append(render_status(collect_status(settings)))

    with Clients(url) as clients:
        deployed, changed = rollout_local(settings, b, "run-b", log=log)
    assert changed and deployed.release.revision == b.revision
    (phase,) = deployed.verification["canary"]
    assert phase["weight"] == 0.5 and phase["requests"] >= 5 and phase["error_rate"] == 0
    assert f"canary: {b.revision} answers 50% of requests" in seen[0]
    artifact = render_rollout(settings, b, deployed, changed)  # the run's rollout artifact
    assert "| canary phase |" in artifact and "| 1 | 50% |" in artifact
    assert {status for status, _ in clients.answers} == {200}  # nothing lost or refused
    assert {rev for _, rev in clients.answers} == {a.release.revision, b.revision}
    router = router_status(url)
    assert router["canary"] is None and router["backend"] == deployed.server["url"]


@pytest.mark.parametrize("faults, rule", [
    ({"when_body_contains": LIVE, "status": 500}, "max_error_rate_increase"),
    ({"when_body_contains": LIVE, "delay_s": 0.6}, "max_p95_latency_ratio"),
], ids=["5xx", "slow"])
def test_a_canary_that_breaks_a_rule_on_live_traffic_is_rolled_back_at_once(endpoint, faults,
                                                                            rule):
    settings, a, url, root = endpoint
    b = resolve_release(settings, checkpoint=checkpoint(root, "b", faults))
    with Clients(url) as clients:
        with pytest.raises(RolloutFailed) as failed:
            rollout_local(settings, b, "run-b", log=lambda _m: None)
        after = len(clients.answers)
        time.sleep(1)  # live traffic after the rollback
    assert failed.value.check == "canary" and rule in failed.value.reason
    router = router_status(url)
    assert router["canary"] is None and router["backend"] == a.server["url"]
    state = load_state(settings.rollout.state_dir, "local")
    assert state.active.release.revision == a.release.revision and state.pending is None
    assert state.history[-1]["event"] == "rolled-back" and rule in state.history[-1]["reason"]
    assert processes_mentioning(str(root / "b")) == []  # the canary's server is stopped
    failures = Counter(rev for status, rev in clients.answers if status != 200)
    assert set(failures) <= {b.revision}  # only the canary's share ever failed
    assert len(clients.answers) > after + 5
    assert {status for status, _ in clients.answers[after:]} == {200}


def test_a_phase_with_too_little_traffic_to_judge_fails_closed(endpoint):
    settings, a, url, root = endpoint
    b = resolve_release(settings, checkpoint=checkpoint(root, "b"))
    with pytest.raises(RolloutFailed) as failed:
        rollout_local(settings, b, "run-b", log=lambda _m: None)  # no client sends anything
    assert failed.value.check == "canary" and "min_requests (5)" in failed.value.reason
    assert router_status(url)["backend"] == a.server["url"]
    assert router_status(url)["canary"] is None


ROLL_OUT = ("import sys; from requant.settings import PipelineSettings; "
            "from requant.rollout.local import rollout_local; "
            "from requant.rollout.release import resolve_release; "
            "s = PipelineSettings.model_validate_json(open(sys.argv[1]).read()); "
            "rollout_local(s, resolve_release(s, checkpoint=sys.argv[2]), 'run-killed')")


@pytest.mark.parametrize("step", ["shadow", "canary"])
def test_a_rollout_killed_mid_phase_keeps_serving_and_the_next_one_finishes_it(endpoint, step):
    settings, _, url, root = endpoint
    settings = settings.model_copy(deep=True)
    settings.rollout.local.shadow = ShadowSettings(seconds=2, min_requests=5)
    b_dir = checkpoint(root, "b")
    config = root / "settings.json"
    config.write_text(settings.model_dump_json())
    with Clients(url) as clients:
        killed = subprocess.run([sys.executable, "-c", ROLL_OUT, str(config), str(b_dir)],
                                env={**os.environ, "REQUANT_KILL_AT": step},
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr[-2000:]
        left = load_state(settings.rollout.state_dir, "local").pending
        assert left is not None and router_status(url)[step]["url"] == left.server["url"]
        time.sleep(0.5)  # the endpoint keeps answering
        deployed, _ = rollout_local(settings, resolve_release(settings, checkpoint=b_dir),
                                    "run-b", log=lambda _m: None)
    assert {status for status, _ in clients.answers} == {200}
    assert not pid_running(int(left.server["pid"]))  # the killed rollout's server was reaped
    assert int(deployed.server["pid"]) != int(left.server["pid"])
    assert deployed.verification["shadow"]["copies"] >= 5
    assert deployed.verification["canary"][0]["requests"] >= 5
    router = router_status(url)
    assert router["canary"] is None and router["shadow"] is None
    assert router["backend"] == deployed.server["url"]
    events = [e["event"] for e in load_state(settings.rollout.state_dir, "local").history]
    assert events[-2:] == ["reaped", "deployed"]


def test_requests_a_killed_rollouts_canary_is_answering_finish_before_it_is_reaped(endpoint):
    """The canary answers slowly (0.5 s), so when the next rollout takes it out of the router
    some clients are still waiting on it: reaping its server at once cut them off (502s, seen
    in CI); they are drained first."""
    settings, _, url, root = endpoint
    config = root / "settings.json"
    config.write_text(settings.model_dump_json())
    slow = checkpoint(root, "b", {"when_body_contains": LIVE, "delay_s": 0.5})
    with Clients(url) as clients:
        killed = subprocess.run([sys.executable, "-c", ROLL_OUT, str(config), str(slow)],
                                env={**os.environ, "REQUANT_KILL_AT": "canary"},
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr[-2000:]
        time.sleep(1)  # clients wait on the canary
        assert router_status(url)["inflight"].get(router_status(url)["canary"]["url"], 0) > 0
        deployed, _ = rollout_local(settings, resolve_release(
            settings, checkpoint=checkpoint(root, "c")), "run-c", log=lambda _m: None)
    assert {status for status, _ in clients.answers} == {200}
    assert len(clients.answers) > 10 and str(deployed.release.checkpoint).endswith("c")
    events = [e["event"] for e in load_state(settings.rollout.state_dir, "local").history]
    assert events[-2:] == ["reaped", "deployed"]


def test_a_router_restarted_mid_phase_keeps_the_canary_and_the_phase_is_judged_on(endpoint):
    settings, _, url, root = endpoint
    settings = settings.model_copy(deep=True)
    settings.rollout.local.canary.phases[0].seconds = 5
    b = resolve_release(settings, checkpoint=checkpoint(root, "b"))
    killed: list[int] = []

    def log(line: str) -> None:  # kill -9 the router as the phase begins: supervisord restarts it
        if "answers 50% of live requests" in line:
            killed.append(router_status(url)["pid"])
            os.kill(killed[0], 9)

    with Clients(url):
        deployed, _ = rollout_local(settings, b, "run-b", log=log)
    router = router_status(url)
    assert router["pid"] != killed[0] and router["canary"] is None
    assert router["backend"] == deployed.server["url"]
    assert deployed.verification["canary"][0]["requests"] >= 5  # counted since its restart


# ---- shadow copies ----------------------------------------------------------------------------


def chat_answer(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def test_each_pair_is_classified_by_what_both_sides_answered():
    greedy = json.dumps({"temperature": 0, "messages": []}).encode()
    sampled = json.dumps({"temperature": 0.7, "messages": []}).encode()
    streamed = json.dumps({"temperature": 0, "stream": True}).encode()
    ok = Answer(200, chat_answer("4"), 0.1)
    assert outcome(greedy, ok, Answer(200, chat_answer("4"), 0.2)) == "agree"
    assert outcome(greedy, ok, Answer(200, chat_answer("5"), 0.2)) == "differ"
    assert outcome(sampled, ok, Answer(200, chat_answer("5"), 0.2)) == "unjudged"
    assert outcome(streamed, ok, Answer(200, b"data: ...", 0.2)) == "unjudged"
    assert outcome(greedy, ok, Answer(400, b"{}", 0.2)) == "status"
    assert outcome(greedy, ok, Answer(503, b"{}", 0.2)) == "shadow_error"
    assert outcome(greedy, ok, Answer(None, b"", 0.2)) == "shadow_error"
    assert outcome(greedy, Answer(502, b"", 0.1), Answer(200, chat_answer("4"), 0.2)) == \
        "serving_error"


def pairs(agree: int = 0, differ: int = 0, failed: int = 0, serving_error: int = 0) -> Pairs:
    fast = traffic(agree + differ + failed + serving_error, latency_s=0.01)
    return Pairs((("agree", agree), ("differ", differ), ("serving_error", serving_error),
                  ("shadow_error", failed)), fast, fast)


def test_the_shadow_rules_hold_at_their_limits_and_break_just_past_them():
    cfg = ShadowSettings(seconds=1, min_requests=100, min_agreement=0.8,
                         max_error_rate_increase=0.02)
    assert shadow_breach(pairs(agree=80, differ=20), cfg) is None  # 80 % agreement: holds
    reason = shadow_breach(pairs(agree=79, differ=21), cfg)
    assert reason and "min_agreement" in reason and "79 of 100" in reason
    assert shadow_breach(pairs(agree=98, failed=2), cfg) is None  # 2 % failed: holds
    reason = shadow_breach(pairs(agree=97, failed=3), cfg)
    assert reason and "max_error_rate_increase" in reason
    # the serving revision's own failures are not the shadow's, and not judged
    assert shadow_breach(pairs(agree=99, serving_error=50), cfg) is None
    assert shadow_breach(pairs(agree=10, differ=89), cfg) is None  # 99 judged: not yet
    assert shadow_breach(pairs(agree=10, differ=90), cfg.model_copy(
        update={"min_agreement": None})) is None


def test_the_router_copies_its_share_answers_from_the_serving_revision_and_counts_pairs(
        two_upstreams, tmp_path):
    a, b = two_upstreams
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        client.put("/-/backend", json={"url": a.url, "revision": "rev-a"}, headers=ADMIN)
        bad = client.put("/-/shadow", json={"url": b.url, "share": 0}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"].startswith("body.share")
        assert client.put("/-/shadow", json={"url": b.url}).status_code == 401
        r = client.put("/-/shadow", headers=ADMIN,
                       json={"url": b.url, "revision": "rev-b", "share": 0.5})
        assert r.json()["shadow"] == {"url": b.url, "revision": "rev-b", "share": 0.5}
        answers = [client.post("/v1/chat/completions", json={"temperature": 0})
                   for _ in range(10)]
        assert {x.json()["backend"] for x in answers} == {"A"}  # clients see the serving one
        assert {x.headers[REVISION_HEADER] for x in answers} == {"rev-a"}
        client.get("/v1/models")  # not a completion: never copied
        deadline = time.monotonic() + 10
        while (found := parse_pairs(client.get("/-/metrics").text).get("rev-b")) is None or \
                found.total < 5:
            assert time.monotonic() < deadline, "the pairs were not counted"
            time.sleep(0.05)
        assert found.total == 5 and found.count("unjudged") == 5  # half, exactly
        assert found.shadow.requests == found.serving.requests == 5
        share = f'requant_router_shadow_share{{backend="{b.url}",revision="rev-b"}} 0.5'
        assert share in client.get("/-/metrics").text
        assert client.delete("/-/shadow", headers=ADMIN).json()["shadow"] is None


def shadow_only(settings: PipelineSettings, **shadow) -> PipelineSettings:
    return settings.model_copy(update={"rollout": settings.rollout.model_copy(update={
        "local": settings.rollout.local.model_copy(update={
            "canary": CanarySettings(),
            "shadow": ShadowSettings(seconds=2, min_requests=5, **shadow)})})})


def test_a_shadow_that_agrees_is_rolled_out_unseen_by_clients_until_the_switch(endpoint):
    settings, a, url, root = endpoint
    # agreement is the subject: two stand-ins' p95 on two busy cores is jitter (the latency
    # rule has its own tests); the likely cause of one failure here under a concurrent demo run
    settings = shadow_only(settings, max_p95_latency_ratio=None)
    b = resolve_release(settings, checkpoint=checkpoint(root, "b"))
    switched_at: list[int] = []
    with Clients(url) as clients:
        def log(line: str) -> None:  # answers received before this line began before the switch
            if line.startswith("traffic shifted"):
                switched_at.append(len(clients.answers))

        deployed, _ = rollout_local(settings, b, "run-b", log=log)
    shadow = deployed.verification["shadow"]
    assert shadow["agreement"] == 1.0 and shadow["copies"] >= 5
    assert shadow["outcomes"]["agree"] >= 5 and deployed.verification["canary"] == []
    assert {status for status, _ in clients.answers} == {200}
    assert switched_at[0] > 20  # the shadow phase had live traffic, all of it answered by A
    assert {rev for _, rev in clients.answers[:switched_at[0]]} == {a.release.revision}
    assert router_status(url)["shadow"] is None


@pytest.mark.parametrize("faults, rule", [
    ({"when_body_contains": LIVE, "content": "something else"}, "min_agreement"),
    ({"when_body_contains": LIVE, "status": 500}, "max_error_rate_increase"),
], ids=["disagrees", "fails"])
def test_a_shadow_that_breaks_a_rule_is_rolled_back_and_no_client_ever_saw_it(endpoint, faults,
                                                                             rule):
    settings, a, url, root = endpoint
    settings = shadow_only(settings)
    b = resolve_release(settings, checkpoint=checkpoint(root, "b", faults))
    with Clients(url) as clients, pytest.raises(RolloutFailed) as failed:
        rollout_local(settings, b, "run-b", log=lambda _m: None)
    assert failed.value.check == "shadow" and rule in failed.value.reason
    assert set(clients.answers) == {(200, a.release.revision)}  # all from the serving one
    router = router_status(url)
    assert router["shadow"] is None and router["backend"] == a.server["url"]
    assert processes_mentioning(str(root / "b")) == []
