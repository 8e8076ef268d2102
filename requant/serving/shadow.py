"""Shadow traffic: copies of live requests sent to a rollout's new revision, its answers
compared with the serving revision's and thrown away.

Before the new revision serves anyone, it answers what clients really send. The router sends a
copy of each completion request (``share`` of them) to the shadow at the moment it forwards the
original, so both see the same moment's load; the client's answer comes from the serving
revision alone and is never delayed by the shadow (the comparison runs after the client's
response is over). Each pair is counted by outcome:

- ``agree`` / ``differ``: both answered 2xx to a greedy request (temperature 0, not streamed),
  with the same or different choices' text (for a requantized model most should agree);
- ``unjudged``: both answered, the request was sampled or streamed (no single right answer);
- ``status``: both answered, with different status codes (a 4xx on one side only);
- ``shadow_error``: the shadow failed (5xx, or no answer) where the serving revision did not;
- ``serving_error``: the serving revision failed; not the shadow's fault, not judged.

The latencies of each pair go into one histogram with ``role`` = ``shadow``/``serving``, so the
two p95s compare the same requests. A shadow's failure never reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

#: The requests worth copying: what a model answers. Health, models, metrics are not.
SHADOWED_PATHS = ("/v1/chat/completions", "/v1/completions")
#: The serving answer is kept for the comparison up to this size (a longer one is unjudged).
CAPTURE_LIMIT = 1 << 20


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (connection failed, timed out)
    body: bytes
    seconds: float


def wants_copy(method: str, path: str) -> bool:
    return method == "POST" and path in SHADOWED_PATHS


def is_greedy(body: bytes) -> bool:
    """One right answer to compare: temperature 0, one choice, not streamed."""
    try:
        request = json.loads(body)
    except ValueError:
        return False
    return (isinstance(request, dict) and request.get("temperature") == 0
            and not request.get("stream") and request.get("n") in (None, 1))


def choices_text(body: bytes) -> list[str] | None:
    """The answer's choices as text (a completion's ``text``, a chat's message content)."""
    try:
        payload = json.loads(body)
        return [c.get("text") if "text" in c else (c.get("message") or {}).get("content")
                for c in payload["choices"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def outcome(request: bytes, serving: Answer, shadow: Answer) -> str:
    if serving.status is None or serving.status >= 500:
        return "serving_error"
    if shadow.status is None or shadow.status >= 500:
        return "shadow_error"
    if serving.status != shadow.status:
        return "status"
    if serving.status >= 300 or not is_greedy(request):
        return "unjudged"
    mine, theirs = choices_text(shadow.body), choices_text(serving.body)
    if mine is None or theirs is None:
        return "unjudged"
    return "agree" if mine == theirs else "differ"


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...]) -> None:
        self.pairs = Counter(
            "requant_router_shadow_pairs", "Live requests copied to a shadow revision, by the "
            "shadow's revision and the pair's outcome (agree, differ, unjudged, status, "
            "shadow_error, serving_error).", ["revision", "outcome"], registry=registry)
        self.latency = Histogram(
            "requant_router_shadow_duration_seconds", "Each copied request's latency on the "
            "shadow (role=shadow) and on the serving revision (role=serving), by the shadow's "
            "revision: the two p95s compare the same requests.", ["revision", "role"],
            buckets=buckets, registry=registry)


class Shadowing:
    """Sends the copies and compares the pairs, for one router."""

    def __init__(self, client: httpx.AsyncClient, metrics: ShadowMetrics) -> None:
        self.client, self.metrics = client, metrics
        self.pending: set[asyncio.Task[Any]] = set()

    def send(self, shadow: dict[str, Any], path: str, headers: dict[str, str],
             body: bytes) -> asyncio.Task[Answer]:
        task = asyncio.create_task(self._call(f"{shadow['url']}{path}", headers, body))
        self._keep(task)
        return task

    async def _call(self, url: str, headers: dict[str, str], body: bytes) -> Answer:
        started = time.monotonic()
        plain = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
        try:
            response = await self.client.post(url, headers=plain, content=body)
            return Answer(response.status_code, response.content, time.monotonic() - started)
        except httpx.HTTPError:
            return Answer(None, b"", time.monotonic() - started)

    def compare_later(self, revision: str, request: bytes, serving: Answer,
                      copy: asyncio.Task[Answer]) -> None:
        """After the client's response is over: wait for the shadow, count the pair."""
        self._keep(asyncio.create_task(self._compare(revision, request, serving, copy)))

    async def _compare(self, revision: str, request: bytes, serving: Answer,
                       copy: asyncio.Task[Answer]) -> None:
        try:
            shadow = await copy
        except asyncio.CancelledError:
            return
        self.metrics.pairs.labels(revision, outcome(request, serving, shadow)).inc()
        self.metrics.latency.labels(revision, "shadow").observe(shadow.seconds)
        self.metrics.latency.labels(revision, "serving").observe(serving.seconds)

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self.pending.add(task)  # a task nobody holds may be collected before it ends
        task.add_done_callback(self.pending.discard)

    async def close(self) -> None:
        for task in list(self.pending):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
