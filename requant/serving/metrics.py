"""The router's Prometheus metrics (``GET /-/metrics``): what it answered, how fast, for which
revision, and the state it routes by.

Counts and latencies are recorded when a response is over (however it ended: completed, the
upstream failed mid-stream, the client left), per revision and backend, so two revisions behind
one endpoint can be compared on live traffic; in-flight counts, backend health and the routing
state are read from the router's own state at scrape time, so they are never stale. The names
are listed in docs/rollout.md ("Metrics"). Nothing here carries a secret: the endpoint answers
any client, as vLLM's ``/metrics`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

#: LLM requests last from milliseconds (a 404, a health probe) to minutes (a long stream).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class RoutingState(Protocol):
    backend: str | None
    revision: str | None
    fallback: str | None
    fallback_revision: str | None
    canary: dict[str, Any] | None
    shadow: dict[str, Any] | None
    inflight: Any  # Counter[str]

    def healthy(self, url: str | None) -> bool: ...


class RouterMetrics:
    """One registry per router app (tests start several in one process)."""

    def __init__(self, state: RoutingState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "requant_router_requests", "Responses the router finished, by revision, backend "
            "and status code (the router's own 502/503 have backend \"none\" when no backend "
            "took the request).", ["revision", "backend", "code"], registry=self.registry)
        self.latency = Histogram(
            "requant_router_request_duration_seconds", "From the request's arrival to the "
            "end of its response (the whole stream), by revision.", ["revision"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(state))

    def observe(self, revision: str | None, backend: str | None, code: int,
                seconds: float) -> None:
        self.requests.labels(revision or "none", backend or "none", str(code)).inc()
        self.latency.labels(revision or "none").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read from the routing state when scraped."""

    def __init__(self, state: RoutingState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        inflight = GaugeMetricFamily("requant_router_inflight", "Requests in flight, by "
                                     "backend.", labels=["backend"])
        for backend, n in sorted(s.inflight.items()):
            inflight.add_metric([backend], n)
        up = GaugeMetricFamily("requant_router_backend_up", "1 when the backend answers its "
                               "health checks (unknown counts as up), by role.",
                               labels=["role", "backend", "revision"])
        for role, url, revision in (("active", s.backend, s.revision),
                                    ("fallback", s.fallback, s.fallback_revision)):
            if url:
                up.add_metric([role, url, revision or ""], 1.0 if s.healthy(url) else 0.0)
        routable = GaugeMetricFamily("requant_router_routable", "1 when a request arriving "
                                     "now has a backend to go to.")
        routable.add_metric([], 1.0 if (s.backend and s.healthy(s.backend)) or (
            s.fallback and s.healthy(s.fallback)) else 0.0)
        canary = _phase_gauge("requant_router_canary_weight", "Share of requests sent to a "
                              "rollout's canary (absent: no canary phase)", s, s.canary,
                              "weight", up, "canary")
        shadow = _phase_gauge("requant_router_shadow_share", "Share of completion requests "
                              "copied to a rollout's shadow (absent: no shadow phase)", s,
                              s.shadow, "share", up, "shadow")
        yield from (inflight, up, routable, canary, shadow)


def _phase_gauge(name: str, doc: str, s: RoutingState, phase: dict[str, Any] | None, key: str,
                 up: GaugeMetricFamily, role: str) -> GaugeMetricFamily:
    """A live phase's share as a gauge, and its backend's health under ``role``: the canary
    and the shadow are exported alike, so a dashboard reads them alike."""
    gauge = GaugeMetricFamily(name, f"{doc}, by its revision and backend.",
                              labels=["revision", "backend"])
    if phase:
        labels = [phase.get("revision") or "", phase["url"]]
        gauge.add_metric(labels, float(phase[key]))
        up.add_metric([role, phase["url"], labels[0]], 1.0 if s.healthy(phase["url"]) else 0.0)
    return gauge
