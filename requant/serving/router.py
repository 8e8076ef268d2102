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
verified revision instead of answering 503. The admin API (``/-/status``, ``/-/backend``) only
answers loopback clients.

Run: python -m requant.serving.router --port 8000 \
         --state-file .cache/requant/rollout/local/router.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from requant.atomic import write_json_atomic

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}
REVISION_HEADER = "x-requant-revision"


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


def create_app(state_file: Path | None = None, timeout_s: float = 600) -> Starlette:
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
        try:
            upstream = await client.send(
                client.build_request(request.method, url, headers=headers,
                                     content=await request.body()),
                stream=True,
            )
        except httpx.HTTPError as exc:
            state.inflight[backend] -= 1
            return JSONResponse({"error": f"backend {backend} failed: {exc!r}"}, 502)

        async def done() -> None:
            await upstream.aclose()
            state.inflight[backend] -= 1
            state.served[backend] += 1

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers[REVISION_HEADER] = revision or ""
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 headers=out_headers, background=BackgroundTask(done))

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
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    app = create_app(args.state_file, args.timeout_s)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=30)
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
