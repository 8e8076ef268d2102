"""The stable endpoint of a local deployment: a small reverse proxy in front of vLLM servers.

Clients keep one URL (and one served model name) across revisions; a rollout starts the new
server beside the old one, verifies it, then switches the router's backend. The switch is one
assignment: requests already in flight finish on the old server (the router counts them per
backend, so the rollout can drain before stopping it), and every request that starts after the
switch goes to the new one. No request is refused at any point, which is the whole point of
blue/green.

Why our own proxy rather than vllm-router or production-stack's router: both route among a
*static or discovered* pool and do not expose "switch, then tell me when the old backend has no
requests left", which is exactly what a zero-downtime swap needs; this is ~150 lines of
Starlette/httpx that the pipeline environment already has.

The backend is persisted (``--state-file``), so a restarted router resumes serving the last
verified revision instead of answering 503. The admin API answers loopback clients only;
switching the backend (``PUT /-/backend``) also needs the bearer token from ``--token-file``
(created 0600 on first use: only the owner can read it). ``GET /-/status`` is read-only and
carries no secret, so status tools need no token.

In-flight counts are exact: a request is counted before the first await and released exactly
once when its response ends, whether it completed, the upstream failed mid-stream, or the
client went away (a BackgroundTask alone does not run in the last two cases).

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

from requant.atomic import write_json_atomic

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}
REVISION_HEADER = "x-requant-revision"


def load_or_create_token(path: Path) -> str:
    """The admin token: created once with mode 0600 (O_EXCL: two creators cannot both win)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


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
        self.switched_at: float | None = None
        self.inflight: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        if state_file and state_file.is_file():
            saved = json.loads(state_file.read_text())
            self.backend, self.revision = saved.get("backend"), saved.get("revision")
            self.switched_at = saved.get("switched_at")

    def switch(self, backend: str, revision: str | None) -> None:
        self.backend, self.revision, self.switched_at = backend.rstrip("/"), revision, time.time()
        if self.state_file:
            write_json_atomic(self.state_file, {"backend": self.backend, "revision": revision,
                                                "switched_at": self.switched_at})

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "revision": self.revision,
                "switched_at": self.switched_at, "inflight": dict(self.inflight),
                "served": dict(self.served)}


def create_app(state_file: Path | None, token: str, timeout_s: float = 600) -> Starlette:
    state = RouterState(state_file)
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10),
                               limits=httpx.Limits(max_connections=None,
                                                   max_keepalive_connections=256))

    def admin_only(request: Request) -> Response | None:
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            return JSONResponse({"error": "the admin API answers loopback clients only"}, 403)
        return None

    async def status(request: Request) -> Response:
        return admin_only(request) or JSONResponse(state.status())

    async def set_backend(request: Request) -> Response:
        if refused := admin_only(request):
            return refused
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "switching the backend needs the router's token "
                                 "(Authorization: Bearer <the --token-file's content>)"}, 401)
        body = await request.json()
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return JSONResponse({"error": "body.url: an http(s) URL of a vLLM server"}, 400)
        previous = state.backend
        state.switch(url, body.get("revision"))
        return JSONResponse(state.status() | {"previous": previous})

    async def proxy(request: Request) -> Response:
        backend, revision = state.backend, state.revision
        if backend is None:
            return JSONResponse({"error": "no backend deployed yet"}, 503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = f"{backend}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        state.inflight[backend] += 1  # counted before the first await: a drain can't miss it
        released = False

        async def release(upstream: httpx.Response | None, served: bool) -> None:
            nonlocal released
            if not released:
                released = True
                state.inflight[backend] -= 1
                state.served[backend] += int(served)
                if upstream is not None:
                    await upstream.aclose()

        try:
            upstream = await client.send(
                client.build_request(request.method, url, headers=headers,
                                     content=await request.body()),
                stream=True,
            )
        except BaseException as exc:  # upstream error, or the client left while we waited
            await release(None, False)
            if isinstance(exc, httpx.HTTPError):
                return JSONResponse({"error": f"backend {backend} failed: {exc!r}"}, 502)
            raise

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers[REVISION_HEADER] = revision or ""
        return CountedStreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                        headers=out_headers,
                                        on_close=lambda: release(upstream, True))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/-/status", status, methods=["GET"]),
            Route("/-/backend", set_backend, methods=["PUT"]),
            Route("/{path:path}", proxy, methods=methods),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m requant.serving.router", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--state-file", type=Path)
    parser.add_argument("--token-file", type=Path, required=True,
                        help="the admin token (created 0600 when missing)")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    app = create_app(args.state_file, load_or_create_token(args.token_file), args.timeout_s)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=30)
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
