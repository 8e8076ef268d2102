"""Shadow and canary phases on the local router: live traffic, judged on the router's metrics.

The load test proves a revision can carry synthetic load; only real requests show how it
answers what clients actually send. Between the load test and the switch, a shadow phase first
copies live requests to the new revision (``PUT /-/shadow``; its answers compared with the
serving revision's and thrown away: ``requant.serving.shadow``), then each canary phase sends a
share of the live requests to the new revision (``PUT /-/canary``) and compares the two
revisions on the very numbers the router exports at ``/-/metrics`` (what a dashboard shows is
what decided): the share of 5xx answers and the p95 latency, counted from the phase's start.
The first breach removes the canary at once (``DELETE /-/canary``: its share goes back to the
serving revision) and fails the rollout; so does a phase that ends before the new revision
answered enough requests to judge (no evidence, no promotion, as the gate fails closed).

Both live in the router's persisted state: a rollout killed mid-phase leaves them there, and
the next rollout's recovery removes them before it reaps the unfinished revision's server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from requant.errors import DeploymentCheckFailed
from requant.killpoints import kill_point
from requant.settings import CanaryPhase, CanarySettings, ShadowSettings

Log = Callable[[str], None]
M = TypeVar("M")  # what a phase measures


@dataclass(frozen=True)
class Traffic:
    """One revision's answers as the router counted them: since it started, or (the
    difference of two scrapes) within a phase."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx, the router's own 502/503 for it included
    buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count)

    def minus(self, earlier: Traffic) -> Traffic:
        before = dict(earlier.buckets)
        return Traffic(self.requests - earlier.requests, self.errors - earlier.errors,
                       tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """As Prometheus' ``histogram_quantile``: linear within the bucket that holds it; in
        the +Inf bucket, the highest finite bound."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - below) / (n - below) if n > below else le
            lower, below = le, n
        return lower


@dataclass(frozen=True)
class Pairs:
    """A shadow revision's copied requests: outcomes (``requant.serving.shadow``) and both
    sides' latencies on them."""

    outcomes: tuple[tuple[str, float], ...] = ()
    shadow: Traffic = Traffic()
    serving: Traffic = Traffic()

    def count(self, *names: str) -> float:
        return sum(n for outcome, n in self.outcomes if outcome in names)

    @property
    def total(self) -> float:
        return self.count(*(outcome for outcome, _ in self.outcomes))

    @property
    def judged(self) -> float:
        """Copies the serving revision answered: those it failed are not the shadow's."""
        return self.total - self.count("serving_error")

    @property
    def greedy(self) -> float:
        return self.count("agree", "differ")

    def minus(self, earlier: Pairs) -> Pairs:
        before = dict(earlier.outcomes)
        return Pairs(tuple((o, n - before.get(o, 0.0)) for o, n in self.outcomes),
                     self.shadow.minus(earlier.shadow), self.serving.minus(earlier.serving))


def parse_pairs(text: str) -> dict[str, Pairs]:
    """The router's shadow counters, by the shadow's revision."""
    outcomes: dict[str, dict[str, float]] = {}
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            revision = sample.labels.get("revision", "")
            if sample.name == "requant_router_shadow_pairs_total":
                outcomes.setdefault(revision, {})[sample.labels["outcome"]] = sample.value
            elif sample.name == "requant_router_shadow_duration_seconds_bucket":
                buckets.setdefault((revision, sample.labels["role"]), []).append(
                    (float(sample.labels["le"]), sample.value))

    def side(revision: str, role: str) -> Traffic:
        b = tuple(sorted(buckets.get((revision, role), [])))
        return Traffic(b[-1][1] if b else 0.0, 0.0, b)

    return {rev: Pairs(tuple(sorted(found.items())), side(rev, "shadow"), side(rev, "serving"))
            for rev, found in outcomes.items()}


def parse_traffic(text: str) -> dict[str, Traffic]:
    """The router's ``/-/metrics`` page, by revision."""
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            revision = sample.labels.get("revision", "")
            if sample.name == "requant_router_requests_total":
                requests[revision] = requests.get(revision, 0.0) + sample.value
                if sample.labels.get("code", "").startswith("5"):
                    errors[revision] = errors.get(revision, 0.0) + sample.value
            elif sample.name == "requant_router_request_duration_seconds_bucket":
                buckets.setdefault(revision, []).append((float(sample.labels["le"]),
                                                         sample.value))
    return {rev: Traffic(requests.get(rev, 0.0), errors.get(rev, 0.0),
                         tuple(sorted(buckets.get(rev, []))))
            for rev in set(requests) | set(buckets)}


def router_call(method: str, url: str, path: str, *, what: str, token: str | None = None,
                body: Any = None, attempts: int = 5) -> httpx.Response:
    """A call to the local router, retried with back-off (0.5, 1, 2, ... s): a momentary
    hiccup, or a router that supervisord is restarting. ``what`` names it when all fail."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            response = httpx.request(method, f"{url}{path}", json=body, timeout=10, headers={
                "Authorization": f"Bearer {token}"} if token else None)
            response.raise_for_status()
            return response
        except httpx.HTTPError as exc:
            last = exc
            if attempt < attempts - 1:
                time.sleep(0.5 * 2 ** attempt)
    raise RuntimeError(f"could not {what} at {url}: {last}")


def wait_drained(read_status: Callable[[], dict[str, Any] | None], backend: str,
                 timeout_s: float) -> int | None:
    """Wait until the router reports no request in flight to ``backend``; returns what was
    left, or None when the router could not be asked (never taken as drained: the whole
    timeout is waited out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = read_status()
        left = None if status is None else int(status.get("inflight", {}).get(backend, 0))
        if left is not None and left <= 0:
            return 0
        if time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def scrape(url: str) -> str:
    """The router's metrics page; retried over ~15 s, the time supervisord takes to restart a
    router that died (its counters then start again at zero: the phases see it)."""
    return router_call("GET", url, "/-/metrics", what="read the router's metrics",
                       attempts=6).text


def breach(canary: Traffic, serving: Traffic, cfg: CanarySettings) -> str | None:
    """Why the canary must go, judged once it answered ``min_requests`` in this phase; None
    while it holds (or cannot be judged yet)."""
    if canary.requests < cfg.min_requests:
        return None
    excess = canary.error_rate - serving.error_rate
    if excess > cfg.max_error_rate_increase:
        return (f"{canary.errors:.0f} of its {canary.requests:.0f} answers were 5xx "
                f"({canary.error_rate:.1%}) against {serving.error_rate:.1%} on the serving "
                f"revision: more than rollout.local.canary.max_error_rate_increase "
                f"({cfg.max_error_rate_increase:.1%}) above it")
    if cfg.max_p95_latency_ratio is None or serving.requests < cfg.min_requests:
        return None
    mine, theirs = canary.quantile(0.95), serving.quantile(0.95)
    if mine is not None and theirs and mine > cfg.max_p95_latency_ratio * theirs:
        return (f"p95 latency {mine:.2f} s against {theirs:.2f} s on the serving revision: "
                f"more than rollout.local.canary.max_p95_latency_ratio "
                f"({cfg.max_p95_latency_ratio}) times it")
    return None


def shadow_breach(pairs: Pairs, cfg: ShadowSettings) -> str | None:
    """Why the shadow must go, judged once ``min_requests`` copies were answered by both
    sides (those the serving revision failed are not the shadow's to answer for)."""
    judged, greedy = pairs.judged, pairs.greedy
    if judged < cfg.min_requests:
        return None
    failed = pairs.count("shadow_error", "status")
    if failed / judged > cfg.max_error_rate_increase:
        return (f"{failed:.0f} of {judged:.0f} copies failed on the new revision (5xx, no "
                f"answer, or another status) where the serving revision answered: more than "
                f"rollout.local.shadow.max_error_rate_increase ({cfg.max_error_rate_increase:.1%})")
    if cfg.min_agreement is not None and greedy >= cfg.min_requests and (
            pairs.count("agree") / greedy < cfg.min_agreement):
        return (f"the two revisions gave the same answer to {pairs.count('agree'):.0f} of "
                f"{greedy:.0f} greedy requests ({pairs.count('agree') / greedy:.1%}): below "
                f"rollout.local.shadow.min_agreement ({cfg.min_agreement:.0%})")
    mine, theirs = pairs.shadow.quantile(0.95), pairs.serving.quantile(0.95)
    if cfg.max_p95_latency_ratio is not None and mine is not None and theirs and (
            mine > cfg.max_p95_latency_ratio * theirs):
        return (f"p95 latency {mine:.2f} s on the copies against {theirs:.2f} s on the serving "
                f"revision for the same requests: more than "
                f"rollout.local.shadow.max_p95_latency_ratio ({cfg.max_p95_latency_ratio}) "
                "times it")
    return None


def put_phase(url: str, token: str, kind: str, body: dict[str, Any] | None) -> None:
    """Set (a body) or remove (None) the router's ``kind`` (canary, shadow)."""
    router_call("PUT" if body is not None else "DELETE", url, f"/-/{kind}", token=token,
                body=body, what=f"{'set' if body else 'remove'} the {kind}")


@dataclass(frozen=True)
class NewRevision:
    """The new revision's server in a rollout, and the revision it is compared with."""

    router: str
    token: str
    backend: str
    revision: str
    serving_revision: str
    alive: Callable[[], bool]


def run_shadow(c: NewRevision, cfg: ShadowSettings, poll_s: float, log: Log) -> dict[str, Any]:
    """The shadow phase; its record. The copies stop however it ends; a breach raises
    ``DeploymentCheckFailed("shadow", …)``."""
    where = f"shadow ({cfg.share:.0%} of requests copied for {cfg.seconds:g} s)"
    start = parse_pairs(scrape(c.router)).get(c.revision, Pairs())

    def since_start(page: str) -> Pairs:
        nonlocal start
        now = parse_pairs(page).get(c.revision, Pairs())
        if now.total < start.total:
            start = Pairs()  # the router restarted: its counters began again at 0
        return now.minus(start)

    try:
        put_phase(c.router, c.token, "shadow", {"url": c.backend, "revision": c.revision,
                                                "share": cfg.share})
        log(f"{where}: {c.revision[:12]} answers copies of live requests, unseen by clients")
        kill_point("shadow")
        pairs = watch(c, "shadow", where, cfg.seconds, poll_s, since_start,
                      lambda measured: shadow_breach(measured, cfg))
    finally:
        put_phase(c.router, c.token, "shadow", None)
    judged, greedy = pairs.judged, pairs.greedy
    if judged < cfg.min_requests or (cfg.min_agreement is not None
                                     and greedy < cfg.min_requests):
        raise DeploymentCheckFailed(
            "shadow", f"{where}: {judged:.0f} copies answered by both revisions, {greedy:.0f} "
            f"of them greedy (temperature 0, not streamed); rollout.local.shadow.min_requests "
            f"({cfg.min_requests}) of each are needed to judge it (lengthen the phase, copy "
            "more, or set min_agreement: null for traffic that samples)")
    record = {"seconds": cfg.seconds, "share": cfg.share, "copies": judged,
              "outcomes": dict(pairs.outcomes),
              "agreement": round(pairs.count("agree") / greedy, 4) if greedy else None,
              "p95_s": pairs.shadow.quantile(0.95), "serving_p95_s": pairs.serving.quantile(0.95)}
    log(f"{where} held: {judged:.0f} copies, agreement {record['agreement']}, p95 "
        f"{record['p95_s']} s (serving {record['serving_p95_s']} s)")
    return record


def watch(c: NewRevision, kind: str, where: str, seconds: float, poll_s: float,
          since_start: Callable[[str], M], judge: Callable[[M], str | None]) -> M:
    """Reads the router's metrics every ``poll_s`` until ``seconds`` have passed; a breach, or
    the new server's exit, raises ``DeploymentCheckFailed(kind, …)`` at once. Returns the last
    measurement, for the phase's end."""
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        measured = since_start(scrape(c.router))
        if not c.alive():
            raise DeploymentCheckFailed(kind, f"{where}: the new revision's server exited "
                                        "(or crashed and was restarted by its keeper)")
        if reason := judge(measured):
            raise DeploymentCheckFailed(kind, f"{where}: {reason}")
        if time.monotonic() >= deadline:
            return measured


def run_phases(c: NewRevision, cfg: CanarySettings, log: Log) -> list[dict[str, Any]]:
    """Every canary phase in turn; a record per phase. On a breach (or any failure) the
    canary is removed before ``DeploymentCheckFailed("canary", …)`` or the error propagates."""
    done: list[dict[str, Any]] = []
    try:
        for number, phase in enumerate(cfg.phases, 1):
            done.append(run_phase(c, cfg, number, phase, log))
    except BaseException:
        put_phase(c.router, c.token, "canary", None)  # its share goes back to serving
        raise
    return done


def run_phase(c: NewRevision, cfg: CanarySettings, number: int, phase: CanaryPhase,
              log: Log) -> dict[str, Any]:
    where = f"phase {number} of {len(cfg.phases)} ({phase.weight:.0%} for {phase.seconds:g} s)"
    start = parse_traffic(scrape(c.router))

    def since_start(page: str) -> tuple[Traffic, Traffic]:
        """(the new revision's, the serving revision's) answers in this phase."""
        nonlocal start
        now = parse_traffic(page)
        if any(now.get(rev, Traffic()).requests < t.requests for rev, t in start.items()):
            start = {}  # the router restarted (supervisord): its counters began again at 0
        mine = now.get(c.revision, Traffic()).minus(start.get(c.revision, Traffic()))
        return mine, now.get(c.serving_revision, Traffic()).minus(
            start.get(c.serving_revision, Traffic()))

    put_phase(c.router, c.token, "canary", {"url": c.backend, "revision": c.revision,
                                            "weight": phase.weight})
    log(f"canary {where}: {c.revision[:12]} answers {phase.weight:.0%} of live requests")
    kill_point("canary")
    mine, theirs = watch(c, "canary", where, phase.seconds, cfg.poll_s, since_start,
                         lambda measured: breach(*measured, cfg))
    if mine.requests < cfg.min_requests:
        raise DeploymentCheckFailed(
            "canary", f"{where}: the new revision answered {mine.requests:.0f} live requests, "
            f"fewer than rollout.local.canary.min_requests ({cfg.min_requests}) needed to judge "
            "it; not enough traffic (lengthen the phase, raise its weight or lower the minimum)")
    record = {"phase": number, "weight": phase.weight, "seconds": phase.seconds,
              "requests": mine.requests, "error_rate": round(mine.error_rate, 4),
              "serving_error_rate": round(theirs.error_rate, 4),
              "p95_s": mine.quantile(0.95), "serving_p95_s": theirs.quantile(0.95)}
    log(f"canary {where} held: {mine.requests:.0f} requests, {mine.error_rate:.1%} 5xx "
        f"(serving {theirs.error_rate:.1%}), p95 {record['p95_s']} s (serving "
        f"{record['serving_p95_s']} s)")
    return record
