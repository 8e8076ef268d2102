"""The router's switch/drain semantics, the verification checks, release resolution and the
candidate ledger: fast, no vLLM (the router is tested against plain HTTP upstreams)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient as StarletteClient

from requant.errors import SettingsError, StateFileError
from requant.ledger import candidate_key, find_published, record_published
from requant.rollout.local import check_local_settings
from requant.rollout.release import resolve_release
from requant.rollout.state import Deployed, DeployState, Release, save_state
from requant.serving.checks import slo_violations, well_formed_problems
from requant.serving.loadtest import LoadResult
from requant.serving.router import REVISION_HEADER, create_app, load_or_create_token
from requant.settings import PipelineSettings, SLOSettings
from tests.conftest import wait_answering

TOKEN = "router-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def TestClient(app, client=("127.0.0.1", 50000)):
    """Starlette's test client, calling from 127.0.0.1 as the local tools do (its default peer
    name, 'testclient', is not loopback and is refused like any remote host)."""
    return StarletteClient(app, client=client)


class Upstream:
    """An HTTP server that answers with its name after ``delay_s`` (a stand-in backend)."""

    def __init__(self, name: str, delay_s: float = 0.0, stream_chunks: int = 0,
                 chunk_delay_s: float = 0.0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _stream(self):  # a chunked answer, like a streamed completion
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(stream_chunks):
                        data = f"data: {i}\n\n".encode()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(chunk_delay_s)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))  # as a server does
                if self.path == "/stream":
                    return self._stream()
                time.sleep(outer.delay_s)
                body = json.dumps({"backend": name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.delay_s = delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams():
    a, b = Upstream("A", delay_s=1.0), Upstream("B")
    yield a, b
    a.close()
    b.close()


def test_router_without_a_backend_answers_503_not_a_hang(tmp_path):
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        r = client.get("/v1/models")
        assert r.status_code == 503 and "no backend" in r.json()["error"]


def test_switch_lets_in_flight_requests_finish_on_the_old_backend_and_sends_new_ones_to_new(
        upstreams, tmp_path):
    a, b = upstreams
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        assert client.put("/-/backend", json={"url": a.url, "revision": "rev-a"}, headers=ADMIN).status_code \
            == 200
        results = {}

        def slow_call():
            results["inflight"] = client.post("/v1/chat/completions", json={})

        t = threading.Thread(target=slow_call)
        t.start()
        time.sleep(0.3)  # the request is now in flight on A
        assert client.get("/-/status").json()["inflight"][a.url] == 1
        switched = client.put("/-/backend", json={"url": b.url, "revision": "rev-b"}, headers=ADMIN).json()
        assert switched["previous"] == a.url
        after = client.get("/v1/models")
        assert after.json()["backend"] == "B" and after.headers[REVISION_HEADER] == "rev-b"
        t.join(10)
        assert results["inflight"].json()["backend"] == "A"  # finished where it started
        assert results["inflight"].headers[REVISION_HEADER] == "rev-a"
        status = client.get("/-/status").json()
        assert status["inflight"][a.url] == 0 and status["backend"] == b.url


def test_router_resumes_its_last_backend_after_a_restart(upstreams, tmp_path):
    _, b = upstreams
    state = tmp_path / "router.json"
    with TestClient(create_app(state, TOKEN)) as client:
        client.put("/-/backend", json={"url": b.url, "revision": "rev-b"}, headers=ADMIN)
    with TestClient(create_app(state, TOKEN)) as client:
        r = client.get("/v1/models")
        assert r.json()["backend"] == "B" and r.headers[REVISION_HEADER] == "rev-b"


def test_router_refuses_a_backend_that_is_not_a_url(tmp_path):
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        r = client.put("/-/backend", json={"url": "localhost:8000"}, headers=ADMIN)
        assert r.status_code == 400 and "body.url" in r.json()["error"]


def test_a_dead_backend_without_a_warm_previous_revision_answers_503_with_retry_after(tmp_path):
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        client.put("/-/backend", json={"url": "http://127.0.0.1:9", "revision": "x"}, headers=ADMIN)
        r = client.get("/v1/models")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert "no healthy backend: http://127.0.0.1:9 (revision x)" in r.json()["error"]
        status = client.get("/-/status").json()
        assert status["inflight"] == {"http://127.0.0.1:9": 0}
        assert status["health"]["http://127.0.0.1:9"]["healthy"] is False


class ProcessUpstream:
    """A stand-in backend in its own process, so that killing it closes its connections as a
    dead vLLM's are (a thread server would keep serving open keep-alive connections)."""

    def __init__(self, name: str, root: Path) -> None:
        import subprocess
        import sys

        from requant.serving.server import free_port

        folder = root / name
        (folder / "v1").mkdir(parents=True)
        (folder / "v1" / "models").write_text(json.dumps({"backend": name}))
        (folder / "health").write_text("ok")
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_answering(f"{self.url}/health", 20)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def serve_b_with_a_warm(client: TestClient, a: ProcessUpstream, b: ProcessUpstream) -> None:
    client.put("/-/backend", headers=ADMIN, json={
        "url": b.url, "revision": "rev-b", "fallback": {"url": a.url, "revision": "rev-a"}}
               ).raise_for_status()


def events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "router-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_when_the_active_backend_dies_requests_fail_over_to_the_warm_previous_revision(
        tmp_path):
    a, b = ProcessUpstream("A", tmp_path), ProcessUpstream("B", tmp_path)
    try:
        with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
            serve_b_with_a_warm(client, a, b)
            assert client.get("/v1/models").json()["backend"] == "B"
            b.kill()  # the new revision's server dies (kill -9)
            r = client.get("/v1/models")  # refused by B: answered by A, not failed
            assert r.status_code == 200 and r.json()["backend"] == "A"
            assert r.headers[REVISION_HEADER] == "rev-a"
            assert [e["event"] for e in events(tmp_path)] == ["backend-unhealthy", "failover"]
            assert events(tmp_path)[1]["backend"] == a.url
            assert client.get("/-/status").json()["health"][b.url]["healthy"] is False
    finally:
        a.kill()


def test_health_checks_take_a_dead_backend_out_before_a_request_finds_it(tmp_path):
    a, b = ProcessUpstream("A", tmp_path), ProcessUpstream("B", tmp_path)
    try:
        with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
            serve_b_with_a_warm(client, a, b)
            b.kill()
            deadline = time.monotonic() + 10
            while not any(e["event"] == "failover" for e in events(tmp_path)):
                assert time.monotonic() < deadline, "no failover event within 10 s"
                time.sleep(0.2)
            assert client.get("/-/status").json()["served"] == {}  # no request was needed
            assert client.get("/v1/models").json()["backend"] == "A"
    finally:
        a.kill()


def test_a_fallback_must_be_a_server_url_or_null(tmp_path):
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        r = client.put("/-/backend", headers=ADMIN, json={"url": "http://127.0.0.1:9",
                                                          "fallback": "127.0.0.1:8"})
        assert r.status_code == 400 and "body.fallback" in r.json()["error"]


GOOD = {"object": "chat.completion", "model": "m",
        "choices": [{"message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 2}}


def test_smoke_check_accepts_a_well_formed_answer_and_names_each_defect():
    assert well_formed_problems(GOOD, "m") == []
    bad = json.loads(json.dumps(GOOD))
    bad["model"] = "other"
    bad["choices"][0]["message"]["content"] = "  "
    bad["choices"][0]["finish_reason"] = None
    bad["usage"] = {}
    problems = well_formed_problems(bad, "m")
    assert any("model is 'other'" in p for p in problems)
    assert "the answer is empty" in problems
    assert any("finish_reason" in p for p in problems)
    assert any("completion_tokens" in p for p in problems)
    assert well_formed_problems({"object": "chat.completion", "model": "m", "choices": []},
                                "m") == ["no choices"]


def load(errors=0, p95=1.0, tps=100.0) -> LoadResult:
    return LoadResult(64, 64, errors, 10.0, 0.5, p95, p95, 4096, tps, 6.4,
                      ("HTTP 500: boom",) if errors else ())


def test_slo_check_names_the_setting_each_violation_breaks():
    slo = SLOSettings(max_error_rate=0.0, max_p95_latency_s=2.0, min_tokens_per_s=50)
    assert slo_violations(load(), slo) == []
    found = slo_violations(load(errors=1, p95=3.0, tps=10.0), slo)
    assert len(found) == 3
    assert "rollout.slo.max_error_rate" in found[0] and "HTTP 500" in found[0]
    assert "rollout.slo.max_p95_latency_s" in found[1]
    assert "rollout.slo.min_tokens_per_s" in found[2]
    nothing_ok = LoadResult(64, 64, 64, 1.0, None, None, None, 0, 0.0, 0.0)
    assert any("p95 latency is undefined" in v for v in slo_violations(nothing_ok, slo))


def local(tmp_path: Path, **rollout) -> PipelineSettings:
    return PipelineSettings.model_validate({
        "hub": {"repo_id": "acme/m"},
        "rollout": {"target": "local", "state_dir": str(tmp_path / "state"), **rollout}})


def test_release_needs_exactly_one_of_revision_checkpoint_or_rollback(tmp_path):
    s = local(tmp_path)
    with pytest.raises(SettingsError, match="exactly one"):
        resolve_release(s)
    with pytest.raises(SettingsError, match="exactly one"):
        resolve_release(s, revision="a" * 40, rollback=True)
    with pytest.raises(SettingsError, match="40-character commit SHA"):
        resolve_release(s, revision="main")
    with pytest.raises(SettingsError, match="no previous revision"):
        resolve_release(s, rollback=True)
    with pytest.raises(SettingsError, match=r"rollout\.target"):
        resolve_release(PipelineSettings.model_validate({"rollout": {"target": "none"}}),
                        revision="a" * 40)
    with pytest.raises(SettingsError, match="not a model folder"):
        resolve_release(s, checkpoint=tmp_path)
    assert resolve_release(s, revision="a" * 40) == Release("a" * 40, "acme/m")


def test_rollback_resolves_to_the_previous_revision_on_record(tmp_path):
    s = local(tmp_path)
    prev = Release("b" * 40, "acme/m")
    save_state(s.rollout.state_dir, DeployState(
        "local", active=Deployed(Release("c" * 40, "acme/m"), "t2", "run-2"),
        previous=Deployed(prev, "t1", "run-1")))
    assert resolve_release(s, rollback=True) == prev


def test_local_release_identity_follows_the_checkpoint_bytes(tiny_model, tmp_path):
    import shutil

    s = local(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert resolve_release(s, checkpoint=copy).revision == \
        resolve_release(s, checkpoint=tiny_model).revision
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert resolve_release(s, checkpoint=copy).revision != \
        resolve_release(s, checkpoint=tiny_model).revision


def test_blue_green_refuses_a_fixed_server_port_with_the_fix(tmp_path):
    with pytest.raises(SettingsError, match=r"rollout\.local\.server\.port: must be unset"):
        check_local_settings(local(tmp_path, local={"server": {"port": 8001}}))


def test_candidate_key_changes_with_anything_that_changes_the_candidate(tmp_path):
    base = PipelineSettings()
    key = candidate_key(base, {"model.safetensors": "x"}, None, "r", "c")
    assert key == candidate_key(PipelineSettings(), {"model.safetensors": "x"}, None, "r", "c")
    changed = [
        candidate_key(base, {"model.safetensors": "y"}, None, "r", "c"),
        candidate_key(base, {"model.safetensors": "x"}, None, "r2", "c"),
        candidate_key(base, {"model.safetensors": "x"}, None, "r", "c2"),
        candidate_key(PipelineSettings.model_validate({"gate": {"confidence": 0.9}}),
                      {"model.safetensors": "x"}, None, "r", "c"),
        candidate_key(PipelineSettings.model_validate({"hub": {"repo_id": "a/b"}}),
                      {"model.safetensors": "x"}, None, "r", "c"),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    # where a run writes, and how fast, does not change what it would publish
    moved = PipelineSettings.model_validate({"output_dir": "elsewhere", "cache_dir": "c2",
                                             "evaluation": {"server": {"max_num_seqs": 8}}})
    assert candidate_key(moved, {"model.safetensors": "x"}, None, "r", "c") == key
    assert find_published(tmp_path, key) is None
    record_published(tmp_path, key, "run-1", {"repo_id": "a/b", "commit_sha": "s",
                                              "tag": "t", "dry_run": False}, None)
    assert find_published(tmp_path, key)["commit_sha"] == "s"


@contextlib.contextmanager
def router_process(tmp_path: Path) -> Iterator[tuple[int, dict]]:
    """The router as supervisord starts it (``python -m requant.serving.router``): its port
    and first status, stopped at the end."""
    import subprocess
    import sys

    from requant.processes import stop_process_group
    from requant.serving.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "requant.serving.router", "--port", str(port),
                             "--state-file", str(tmp_path / "r.json"),
                             "--token-file", str(tmp_path / "r.token")], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/-/status", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        yield port, status
    finally:
        stop_process_group(proc.pid, 5)
    assert proc.poll() is not None


def test_router_process_keeps_a_clients_idle_connection_open_past_the_clients_own_expiry(
        tmp_path):
    """httpx (and the openai client) drop an idle connection after 5 s; the router must not
    close it first (at 5 s both sides race: the client's next request meets a closed socket,
    ReadError). Idle 6 s, the same connection answers again."""
    import http.client

    with router_process(tmp_path) as (port, _):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            sockets = []
            for _ in range(2):
                conn.request("GET", "/-/status")  # closed by the router: RemoteDisconnected
                response = conn.getresponse()
                assert response.status == 200 and json.loads(response.read())["pid"]
                sockets.append(conn.sock)
                time.sleep(6)
            assert sockets[0] is sockets[1]  # the same connection, not a new one
        finally:
            conn.close()


def test_router_module_runs_as_a_process_and_answers_its_status(tmp_path):
    with router_process(tmp_path) as (port, status):
        assert status["backend"] is None
        token = tmp_path / "r.token"
        assert token.stat().st_mode & 0o777 == 0o600  # only the owner can read it
        refused = httpx.put(f"http://127.0.0.1:{port}/-/backend", timeout=5,
                            json={"url": "http://127.0.0.1:9"})
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        ok = httpx.put(f"http://127.0.0.1:{port}/-/backend", json={"url": "http://127.0.0.1:9"},
                       headers={"Authorization": f"Bearer {token.read_text()}"}, timeout=5)
        assert ok.status_code == 200


def test_switching_the_backend_needs_the_token(upstreams, tmp_path):
    a, _ = upstreams
    with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.put("/-/backend", json={"url": a.url}, headers=headers)
            assert r.status_code == 401
        assert client.get("/-/status").json()["backend"] is None


def test_token_file_is_created_once_whole_and_owner_only(tmp_path):
    path = tmp_path / "deep" / "router.token"
    first = load_or_create_token(path)
    assert load_or_create_token(path) == first and len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["router.token"]  # no temp file left


def test_in_flight_count_is_released_when_the_client_goes_away_mid_stream(tmp_path):
    """A streaming answer the client abandons half-way: the router must not keep counting it
    (a drain would otherwise wait for a request that no longer exists)."""
    import socket

    import uvicorn

    from requant.serving.server import free_port

    slow = Upstream("S", delay_s=0.0, stream_chunks=600, chunk_delay_s=0.1)  # 60 s
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tmp_path / "r.json", TOKEN),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        httpx.put(f"{base}/-/backend", json={"url": slow.url}, headers=ADMIN).raise_for_status()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64)  # the answer has started streaming
            assert httpx.get(f"{base}/-/status").json()["inflight"][slow.url] == 1
        deadline = time.monotonic() + 10  # the client hung up
        while httpx.get(f"{base}/-/status").json()["inflight"][slow.url] != 0:
            assert time.monotonic() < deadline, "the abandoned request is still counted"
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(10)
        slow.close()


class DroppingUpstream:
    """A backend that closes the first ``drops`` connections right after reading a request,
    without an answer: what a pooled connection looks like when the backend closed it as idle
    at the moment the router reused it (``/health`` is always answered)."""

    def __init__(self, drops: int) -> None:
        import socket

        self.drops, self.requests = drops, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn) -> None:
        with conn:
            while request := conn.recv(65536):
                if not request.startswith((b"GET ", b"POST ")):
                    continue  # the body's own segment
                if not request.startswith(b"GET /health"):
                    self.requests += 1
                    if self.drops > 0:
                        self.drops -= 1
                        return  # closed, unanswered
                body = b'{"backend": "D"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(("drops", "status", "sent"), [(1, 200, 2), (99, 502, 2)])
def test_a_connection_the_backend_closed_unanswered_is_sent_once_more_not_failed(
        tmp_path, drops, status, sent):
    upstream = DroppingUpstream(drops)
    try:
        with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
            client.put("/-/backend", json={"url": upstream.url, "revision": "d"}, headers=ADMIN)
            r = client.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == status, r.text
            assert upstream.requests == sent  # once more, never a loop
            assert client.get("/-/status").json()["inflight"][upstream.url] == 0
    finally:
        upstream.close()


def test_admin_api_refuses_a_client_that_is_not_on_loopback(tmp_path):
    with TestClient(create_app(tmp_path / "router.json", TOKEN), client=("testclient", 1)) as c:
        assert c.get("/-/status").status_code == 403
        assert c.put("/-/backend", json={"url": "http://127.0.0.1:9"},
                     headers=ADMIN).status_code == 403


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_token_file_is_refused_never_taken_as_no_token(tmp_path, content):
    path = tmp_path / "router.token"
    path.write_text(content)
    with pytest.raises(StateFileError, match=r"router\.token: the router's token file is empty"):
        load_or_create_token(path)
    with pytest.raises(StateFileError, match="non-empty admin token"):
        create_app(tmp_path / "router.json", "")


def test_a_corrupt_router_state_file_serves_503s_that_name_it_and_a_switch_repairs_it(
        upstreams, tmp_path):
    _, b = upstreams
    state = tmp_path / "router.json"
    state.write_text('{"backend": "http://127.0.0.1:1", ')  # cut short
    with TestClient(create_app(state, TOKEN)) as client:
        r = client.get("/v1/models")
        assert r.status_code == 503 and "router.json: not valid JSON" in r.json()["error"]
        assert "router.json" in client.get("/-/status").json()["state_error"]
        client.put("/-/backend", json={"url": b.url, "revision": "rev-b"}, headers=ADMIN)
        assert client.get("/v1/models").json()["backend"] == "B"
        assert client.get("/-/status").json()["state_error"] is None
    assert json.loads(state.read_text())["revision"] == "rev-b"


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus text page, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_metrics_count_answers_and_latency_per_revision_and_show_the_routing_state(tmp_path):
    b = Upstream("B")
    try:
        with TestClient(create_app(tmp_path / "router.json", TOKEN)) as client:
            assert client.get("/v1/models").status_code == 503  # nothing deployed yet
            client.put("/-/backend", json={"url": b.url, "revision": "rev-b"},
                       headers=ADMIN).raise_for_status()
            for _ in range(3):
                assert client.post("/v1/completions", json={}).status_code == 200
            page = client.get("/-/metrics", headers={"Authorization": ""})
            assert page.status_code == 200 and page.headers["content-type"].startswith(
                "text/plain")
            text = page.text
    finally:
        b.close()
    assert metric(text, "requant_router_requests_total", revision="rev-b", backend=b.url,
                  code="200") == 3
    assert metric(text, "requant_router_requests_total", revision="none", backend="none",
                  code="503") == 1
    assert metric(text, "requant_router_request_duration_seconds_count", revision="rev-b") == 3
    assert metric(text, "requant_router_backend_up", role="active", backend=b.url,
                  revision="rev-b") == 1
    assert metric(text, "requant_router_routable") == 1
    assert metric(text, "requant_router_inflight", backend=b.url) == 0
    assert TOKEN not in text
