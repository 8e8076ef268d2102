"""The stable endpoint of a local deployment: a small reverse proxy in front of vLLM servers.

Clients keep one URL (and one served model name) across revisions; a rollout starts the new
server beside the old one, verifies it, then switches the router's backend. The switch is one
assignment: requests already in flight finish on the old server (the router counts them per
backend, so the rollout can drain before stopping it), and every request that starts after the
switch goes to the new one. No request is refused at any point, which is the whole point of
blue/green. Before the switch a rollout may have the router copy live requests to the new
server (a shadow: its answers compared, never sent to a client; ``requant.serving.shadow``) and
then send it an exact share of them (a canary), each judged on the metrics below
(``requant.rollout.live_phases``).

Why our own proxy rather than vllm-router or production-stack's router: they route among a
pool and do not expose "switch, then tell me when the old backend has no requests left", a warm
fallback used only while the new backend is down, or a backend that survives the router's own
restart, which is what a zero-downtime swap needs. Its cost under a 64-client load is measured
against vllm-router in docs/rollout.md ("Our router or vllm-router, measured"): real, and open.

The backend is persisted (``--state-file``), so a restarted router resumes serving the last
verified revision instead of answering 503. The admin API answers loopback clients only;
switching the backend (``PUT /-/backend``) also needs the bearer token from ``--token-file``
(created 0600 on first use: only the owner can read it). ``GET /-/status`` is read-only and
carries no secret, so status tools need no token. In a cluster the worker is not on the
router's host: ``--admin-port`` serves the admin API alone to any address, every call (status
too) with the token.

In-flight counts are exact: a request is counted before the first await and released exactly
once when its response ends, whether it completed, the upstream failed mid-stream, or the
client went away (a BackgroundTask alone does not run in the last two cases). Idle upstream
connections are dropped before vLLM's keep-alive timeout, and a request whose connection closes
before any answer is sent once more (``STALE_CONNECTION``): otherwise the race between reuse
and vLLM's close lost about one request per rollout under load.

Run: python -m requant.serving.router --port 8000 \
         --state-file .cache/requant/rollout/local/router.json \
         --token-file .cache/requant/rollout/local/router.token
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from requant.atomic import create_exclusive, read_json, write_json_atomic, write_text_atomic
from requant.errors import StateFileError
from requant.serving.metrics import LATENCY_BUCKETS, RouterMetrics
from requant.serving.shadow import (
    CAPTURE_LIMIT,
    Answer,
    Shadowing,
    ShadowMetrics,
    wants_copy,
)

#: The largest request body the router takes by default: a full 128k-token context as JSON with
#: room to spare (vLLM's own requests are text; 128k tokens are about 0.5 MB).
MAX_BODY_BYTES = 32 << 20
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
LOOPBACK = {"127.0.0.1", "::1"}
REVISION_HEADER = "x-requant-revision"


def load_or_create_token(path: Path) -> str:
    """The admin token: created whole and 0600 (``create_exclusive``: two creators cannot both
    win, a crash never leaves an empty file), then read back. An empty token file (made by hand,
    or by an older version that crashed mid-write) is refused: a router never accepts a switch
    without a token."""
    path = Path(path)
    create_exclusive(path, secrets.token_urlsafe(32))
    token = path.read_text().strip()
    if not token:
        raise StateFileError(f"{path}: the router's token file is empty. Delete it; the next "
                             "start writes a new token.")
    return token


class CountedStreamingResponse(StreamingResponse):
    """Runs ``on_close`` exactly when the response is over, however it ended."""

    def __init__(self, *args: Any, on_close: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


class RouterState:
    def __init__(self, state_file: Path | None) -> None:
        self.state_file = state_file
        self.backend: str | None = None
        self.revision: str | None = None
        self.fallback: str | None = None  # the previous revision, kept warm for a while
        self.fallback_revision: str | None = None
        self.switched_at: float | None = None
        self.canary: dict[str, Any] | None = None  # {url, revision, weight}: a rollout's phase
        self.shadow: dict[str, Any] | None = None  # {url, revision, share}: copies go there
        self.turns = {"canary": 0, "shadow": 0}  # requests seen since each phase was set
        self.inflight: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.health: dict[str, dict[str, Any]] = {}
        self.state_error: str | None = None
        try:
            saved = read_json(state_file, "Fix or delete it, then promote the revision that "
                              "should serve.") if state_file else None
        except StateFileError as exc:  # serve 503s that say why, never a restart loop
            saved, self.state_error = None, str(exc)
        if saved:
            self.backend, self.revision = saved.get("backend"), saved.get("revision")
            self.fallback, self.fallback_revision = saved.get("fallback"), saved.get(
                "fallback_revision")
            self.switched_at = saved.get("switched_at")
            self.canary, self.shadow = saved.get("canary"), saved.get("shadow")

    def switch(self, backend: str, revision: str | None,
               fallback: dict[str, Any] | None = None) -> None:
        self.backend, self.revision, self.switched_at = backend.rstrip("/"), revision, time.time()
        self.fallback = fallback["url"].rstrip("/") if fallback else None
        self.fallback_revision = fallback.get("revision") if fallback else None
        self.canary = self.shadow = None  # a switch ends the live phases: it serves, or not
        self.health = {url: h for url, h in self.health.items()
                       if url in (self.backend, self.fallback)}
        self.state_error = None
        self.save()

    def set_phase(self, kind: str, body: dict[str, Any] | None) -> None:
        """A canary (``weight`` of the requests sent to its server) or a shadow (``share`` of
        the completion requests copied to it); None ends it. Persisted, so a restarted router
        keeps the phase the rollout is judging."""
        key = "weight" if kind == "canary" else "share"
        setattr(self, kind, None if body is None else {
            "url": body["url"].rstrip("/"), "revision": body.get("revision"),
            key: float(body.get(key, 1.0))})
        self.turns[kind] = 0
        self.save()

    def turn(self, kind: str, share: float) -> bool:
        """Exactly ``share`` of the requests, evenly spread (every 20th at 0.05), so a short
        phase already sees its share: the n-th request is the phase's when floor(n * share)
        steps up."""
        n = self.turns[kind] = self.turns[kind] + 1
        return int(n * share) > int((n - 1) * share)

    def save(self) -> None:
        if self.state_file:
            write_json_atomic(self.state_file, {
                "backend": self.backend, "revision": self.revision,
                "switched_at": self.switched_at, "fallback": self.fallback,
                "fallback_revision": self.fallback_revision, "canary": self.canary,
                "shadow": self.shadow})

    def healthy(self, url: str | None) -> bool:
        """Unknown counts as healthy: a backend is only avoided once checks saw it fail."""
        return url is not None and self.health.get(url, {}).get("healthy", True)

    def route(self) -> tuple[str, str | None] | None:
        """Where a request goes now: the canary on its turns, else the active backend, else a
        healthy fallback, else a healthy canary, else None."""
        canary = self.canary
        if canary is not None and self.healthy(canary["url"]) and self.turn(
                "canary", canary["weight"]):
            return canary["url"], canary["revision"]
        for url, revision in ((self.backend, self.revision),
                              (self.fallback, self.fallback_revision),
                              ((canary or {}).get("url"), (canary or {}).get("revision"))):
            if url is not None and self.healthy(url):
                return url, revision
        return None

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "revision": self.revision,
                "fallback": self.fallback, "fallback_revision": self.fallback_revision,
                "switched_at": self.switched_at, "canary": self.canary, "shadow": self.shadow,
                "inflight": dict(self.inflight),
                "served": dict(self.served), "health": self.health, "pid": os.getpid(),
                "state_error": self.state_error}


#: Health checks: every second; a backend is unhealthy after this many failures in a row.
HEALTH_INTERVAL_S, FAILURES_TO_UNHEALTHY = 1.0, 2
#: What a client is told to wait when no backend can answer.
RETRY_AFTER_S = 5
#: Idle upstream connections are dropped after this long: before vLLM's own keep-alive timeout
#: (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s) closes them from its side. At equal timeouts a request
#: sent on a connection the server is closing failed with ReadError (measured: one 502 in a
#: 64-client rollout window, docs/rollout.md).
KEEPALIVE_EXPIRY_S = 2.0
#: How long the router keeps a client's idle connection open. Longer than clients keep theirs
#: (httpx and the openai client: 5 s; uvicorn's default is also 5 s): at equal timeouts a
#: client reusing a connection just as the router closed it gets ReadError('') for a request
#: the router never saw (measured: one failed streamed completion in a 64-client shadow
#: window, docs/rollout.md). The side that closes idle connections must be the client.
CLIENT_KEEPALIVE_S = 75
#: What a reused connection that the backend closed looks like before any response: the backend
#: never read the request, so sending it once more (on another connection) is safe.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class HealthWatch:
    """Asks each backend's ``/health`` every second and records each change of health as an
    event: logged, appended to ``router-events.jsonl`` beside the state file (what ``requant
    status`` and operators read), and sent to Prefect as ``requant.router.<kind>`` when a
    Prefect API is configured."""

    def __init__(self, state: RouterState, client: httpx.AsyncClient) -> None:
        self.state, self.client = state, client
        self.events_file = state.state_file.with_name("router-events.jsonl") \
            if state.state_file else None

    async def run(self) -> None:
        while True:
            extra = [(self.state.canary or {}).get("url"), (self.state.shadow or {}).get("url")]
            for url in [u for u in (self.state.backend, self.state.fallback, *extra) if u]:
                await self.check(url)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def check(self, url: str) -> None:
        try:
            ok = (await self.client.get(f"{url}/health", timeout=2)).status_code == 200
        except httpx.HTTPError:
            ok = False
        self.observe(url, ok)

    def observe(self, url: str, ok: bool, conclusive: bool = False) -> None:
        h = self.state.health.setdefault(url, {"healthy": True, "failures": 0})
        h["failures"] = 0 if ok else max(h["failures"] + 1,
                                         FAILURES_TO_UNHEALTHY if conclusive else 0)
        healthy = ok or (h["healthy"] and h["failures"] < FAILURES_TO_UNHEALTHY)
        if healthy != h["healthy"]:
            h["healthy"], h["changed_at"] = healthy, time.time()
            self.emit("backend-recovered" if healthy else "backend-unhealthy", url)
            if not healthy and url == self.state.backend:
                self.emit("failover" if self.state.healthy(self.state.fallback)
                          else "no-backend", self.state.fallback or url)

    def emit(self, kind: str, url: str) -> None:
        record = {"event": kind, "backend": url, "active": self.state.backend,
                  "revision": self.state.revision, "fallback": self.state.fallback,
                  "at": time.time()}
        print(json.dumps(record), flush=True)  # the router's log (supervisord keeps it)
        if self.events_file:
            with self.events_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if os.environ.get("PREFECT_API_URL"):
            with contextlib.suppress(Exception):  # the event file is the record of truth
                from prefect.events import emit_event

                emit_event(f"requant.router.{kind}", resource={
                    "prefect.resource.id": f"requant.router.{self.state.state_file}"},
                    payload=record)


#: Set in the scope of every request that came in on ``--admin-port``: that listener serves the
#: admin API to any address holding the token (in a cluster, the worker reaches the router's
#: pod across the network), and nothing else.
REMOTE_ADMIN = "requant.remote_admin"


def admin_refusal(request: Request) -> Response | None:
    """The admin API answers loopback clients only, except on the admin port (token always)."""
    if request.scope.get(REMOTE_ADMIN):
        return None
    host = request.client.host if request.client else ""
    if host not in LOOPBACK:
        return JSONResponse({"error": "the admin API answers loopback clients only"}, 403)
    return None


def switch_problem(body: Any) -> str | None:
    """What is wrong with a ``PUT /-/backend`` body, in one line, or None."""
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return "body.url: an http(s) URL of a vLLM server"
    fallback = body.get("fallback")
    if fallback is not None and not (isinstance(fallback, dict) and str(
            fallback.get("url", "")).startswith(("http://", "https://"))):
        return "body.fallback: null, or {url, revision} of the previous revision's server"
    return None


def phase_problem(kind: str, body: Any) -> str | None:
    """What is wrong with a ``PUT /-/canary`` or ``/-/shadow`` body, in one line, or None."""
    if not isinstance(body, dict) or not str(body.get("url", "")).startswith(
            ("http://", "https://")):
        return "body.url: an http(s) URL of the new revision's server"
    field, share = ("weight", body.get("weight")) if kind == "canary" else (
        "share", body.get("share", 1.0))
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1 or (
            kind == "canary" and share == 1):
        return (f"body.{field}: the share of requests for the canary, above 0 and below 1"
                if kind == "canary" else
                f"body.{field}: the share of completion requests copied, above 0, at most 1")
    return None


class InflightSlot:
    """One request counted on its backend from before the first await until its response
    ends, released exactly once (completed, failed upstream, or the client gone)."""

    def __init__(self, state: RouterState, backend: str) -> None:
        self.state, self.backend, self.released = state, backend, False
        state.inflight[backend] += 1  # before the first await: a drain can't miss it

    async def release(self, upstream: httpx.Response | None, served: bool) -> None:
        if self.released:
            return
        self.released = True
        self.state.inflight[self.backend] -= 1
        self.state.served[self.backend] += int(served)
        if upstream is not None:
            await upstream.aclose()


class Router:
    """The app's handlers around one state, one upstream client and one health watch."""

    def __init__(self, state_file: Path | None, token: str, timeout_s: float = 600,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if not token:
            raise StateFileError("the router needs a non-empty admin token (--token-file)")
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.state = RouterState(state_file)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10),
                                        limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=256,
                                                            keepalive_expiry=KEEPALIVE_EXPIRY_S))
        self.watch = HealthWatch(self.state, self.client)
        self.metrics = RouterMetrics(self.state)
        self.shadowing = Shadowing(self.client, ShadowMetrics(self.metrics.registry,
                                                              LATENCY_BUCKETS))

    async def metrics_page(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def refuse(self, status: int, error: str, started: float, revision: str | None = None,
               backend: str | None = None, retry: bool = False) -> Response:
        """An answer the router gives itself (no backend, or one that failed), counted."""
        self.metrics.observe(revision, backend, status, time.monotonic() - started)
        return JSONResponse({"error": error}, status,
                            headers={"Retry-After": str(RETRY_AFTER_S)} if retry else None)

    async def status(self, request: Request) -> Response:
        refused = self.unauthorized(request) if request.scope.get(REMOTE_ADMIN) else (
            admin_refusal(request))  # off this host, even reading needs the token
        return refused or JSONResponse(self.state.status())

    def unauthorized(self, request: Request) -> Response | None:
        """Changing where requests go: loopback clients with the router's token only."""
        if refused := admin_refusal(request):
            return refused
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"error": "changing the routing needs the router's token "
                                 "(Authorization: Bearer <the --token-file's content>)"}, 401)
        return None

    async def set_backend(self, request: Request) -> Response:
        if refused := self.unauthorized(request):
            return refused
        body = await request.json()
        if problem := switch_problem(body):
            return JSONResponse({"error": problem}, 400)
        previous = self.state.backend
        self.state.switch(body["url"], body.get("revision"), body.get("fallback"))
        return JSONResponse(self.state.status() | {"previous": previous})

    async def set_phase(self, request: Request) -> Response:
        """``PUT /-/canary`` {url, revision, weight} sends the new revision that share of the
        requests, ``PUT /-/shadow`` {url, revision, share} copies of that share of them;
        ``DELETE`` ends either at once (its requests go to the active backend alone)."""
        if refused := self.unauthorized(request):
            return refused
        kind = request.url.path.rsplit("/", 1)[-1]
        body = await request.json() if request.method == "PUT" else None
        if request.method == "PUT" and (problem := phase_problem(kind, body)):
            return JSONResponse({"error": problem}, 400)
        if body is not None and self.state.backend is None:
            return JSONResponse({"error": f"a {kind} needs an active backend to compare with: "
                                 "switch to the first revision instead"}, 409)
        self.state.set_phase(kind, body)
        return JSONResponse(self.state.status())

    async def proxy(self, request: Request) -> Response:
        started = time.monotonic()
        if self.state.backend is None:
            return self.refuse(503, self.state.state_error or "no backend deployed yet", started)
        body = await read_body(request, self.max_body_bytes)
        if body is None:
            return self.refuse(413, f"request body over {self.max_body_bytes} bytes, this "
                               "endpoint's limit", started)
        for _attempt in range(2):  # a refused connection marks the backend down: once more
            target = self.state.route()
            if target is None:
                return self.refuse(
                    503, f"no healthy backend: {self.state.backend} (revision "
                    f"{self.state.revision}) is down and no previous revision is kept warm; "
                    "retry shortly", started, self.state.revision, retry=True)
            try:
                return await self.forward(request, body, *target, started)
            except httpx.ConnectError:  # nothing listens: down now, not after two checks
                self.watch.observe(target[0], False, conclusive=True)
        return self.refuse(503, "no backend accepted the connection; retry shortly", started,
                           self.state.revision, retry=True)

    async def forward(self, request: Request, body: bytes, backend: str,
                      revision: str | None, started: float) -> Response:
        headers = end_to_end(request.headers)
        url = f"{backend}{request.url.path}" + (f"?{request.url.query}"
                                                if request.url.query else "")
        slot = InflightSlot(self.state, backend)
        shadow = self.state.shadow
        copy = self.shadowing.send(shadow, url.removeprefix(backend), headers, body) if (
            shadow and wants_copy(request.method, request.url.path)
            and self.state.turn("shadow", shadow["share"])) else None

        def send() -> Any:
            return self.client.send(self.client.build_request(
                request.method, url, headers=headers, content=body), stream=True)

        try:
            try:
                upstream = await send()
            except STALE_CONNECTION:  # see STALE_CONNECTION; a dead backend fails again
                upstream = await send()
        except BaseException as exc:  # upstream error, or the client left while we waited
            await slot.release(None, False)
            if copy is not None and isinstance(exc, httpx.ConnectError):
                copy.cancel()  # proxy() sends the request again, and copies it again
            elif copy is not None:
                self.shadowing.compare_later(shadow["revision"], body, Answer(
                    None, b"", time.monotonic() - started), copy)
            if isinstance(exc, httpx.HTTPError) and not isinstance(exc, httpx.ConnectError):
                return self.refuse(502, f"backend {backend} failed: {exc!r}", started,
                                   revision, backend)
            raise
        out_headers = end_to_end(upstream.headers)
        out_headers[REVISION_HEADER] = revision or ""
        served = bytearray()

        async def relay() -> AsyncIterator[bytes]:  # only for a copied request: a copy of
            async for chunk in upstream.aiter_raw():  # its answer for the comparison
                if len(served) < CAPTURE_LIMIT:
                    served.extend(chunk)
                yield chunk

        async def done() -> None:
            await slot.release(upstream, True)
            seconds = time.monotonic() - started
            self.metrics.observe(revision, backend, upstream.status_code, seconds)
            if copy is not None:
                self.shadowing.compare_later(shadow["revision"], body, Answer(
                    upstream.status_code, bytes(served), seconds), copy)

        return CountedStreamingResponse(upstream.aiter_raw() if copy is None else relay(),
                                        status_code=upstream.status_code,
                                        headers=out_headers, on_close=done)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        checks = asyncio.create_task(self.watch.run())
        yield
        checks.cancel()
        await self.shadowing.close()
        await self.client.aclose()

    def admin_routes(self) -> list[Route]:
        return [Route("/-/status", self.status, methods=["GET"]),
                Route("/-/metrics", self.metrics_page, methods=["GET"]),
                Route("/-/backend", self.set_backend, methods=["PUT"]),
                Route("/-/canary", self.set_phase, methods=["PUT", "DELETE"]),
                Route("/-/shadow", self.set_phase, methods=["PUT", "DELETE"])]

    def app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        return Starlette(routes=[*self.admin_routes(),
                                 Route("/{path:path}", self.proxy, methods=methods)],
                         lifespan=self.lifespan)

    def admin_app(self) -> Any:
        """The admin API alone, for ``--admin-port``: any address, the token on every call
        (metrics excepted: the public port serves them too). No proxying, no lifespan: the
        public app runs the health checks."""
        admin = Starlette(routes=self.admin_routes())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await admin({**scope, REMOTE_ADMIN: True}, receive, send)

        return app


def create_app(state_file: Path | None, token: str, timeout_s: float = 600,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    return Router(state_file, token, timeout_s, max_body_bytes).app()


def end_to_end(headers: Any) -> dict[str, str]:
    """The headers a proxy forwards: not the hop-by-hop ones, nor any a ``Connection`` header
    names (RFC 9110 7.6.1: a client could otherwise strip or smuggle headers past the router)."""
    named = {t.strip().lower() for k, v in headers.items() if k.lower() == "connection"
             for t in v.split(",")}
    return {k: v for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in named}


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is over ``limit`` bytes (its declared length is
    believed first, and the bytes are counted as they arrive: nothing over it is held)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def parser() -> argparse.ArgumentParser:
    """The router's command line (supervisord's program and the systemd unit both use it)."""
    p = argparse.ArgumentParser(prog="python -m requant.serving.router", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-file", type=Path)
    p.add_argument("--token-file", type=Path, required=True,
                   help="the admin token (created 0600 when missing)")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="larger request bodies are answered 413 without being read whole")
    p.add_argument("--admin-port", type=int, default=None,
                   help="also serve the admin API here to any address with the token (in a "
                   "cluster: a port no public Service exposes)")
    return p


async def serve_together(*servers: Any) -> None:
    """Several uvicorn servers in one process, ending together: a signal reaches only the one
    whose handler was installed last, so each one's exit ends the others."""
    async def linked() -> None:
        while not any(s.should_exit for s in servers):
            await asyncio.sleep(0.2)
        for s in servers:
            s.should_exit = True

    await asyncio.gather(*(s.serve() for s in servers), linked())


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parser().parse_args(argv)
    router = Router(args.state_file, load_or_create_token(args.token_file), args.timeout_s,
                    args.max_body_bytes)
    if args.state_file is not None:  # what stops it reads this, never a pid from HTTP
        write_text_atomic(args.state_file.with_name("router.pid"), f"{os.getpid()}\n")
    config = uvicorn.Config(router.app(), host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=CLIENT_KEEPALIVE_S)
    servers = [uvicorn.Server(config)]
    if args.admin_port is not None:
        servers.append(uvicorn.Server(uvicorn.Config(
            router.admin_app(), host=args.host, port=args.admin_port, log_level="warning",
            access_log=False, lifespan="off")))
    asyncio.run(serve_together(*servers))


if __name__ == "__main__":
    main()
