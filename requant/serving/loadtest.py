"""The seed's concurrency test as a library: N concurrent chat completions of M tokens each.

Used to compare W8A8 with BF16 serving (benchmarks/bench_serving.py) and to check a new
deployment against its latency/error SLOs before traffic moves to it (rollout stage). Bounded by
construction: a fixed number of requests, each with a timeout.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from requant.settings import LoadSettings

DEFAULT_PROMPT = "Write a short story about a robot learning to paint."


@dataclass(frozen=True)
class LoadResult:
    requests: int
    concurrency: int
    errors: int
    wall_s: float
    p50_s: float | None
    p95_s: float | None
    max_s: float | None
    completion_tokens: int
    tokens_per_s: float
    requests_per_s: float
    error_samples: tuple[str, ...] = ()

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_record(self) -> dict[str, Any]:
        return asdict(self) | {"error_rate": self.error_rate}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _one(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
               sem: asyncio.Semaphore) -> tuple[float, int, str | None]:
    async with sem:
        started = time.perf_counter()
        try:
            response = await client.post(url, json=payload)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                return elapsed, 0, f"HTTP {response.status_code}: {response.text[:200]}"
            body = response.json()
            return elapsed, int(body.get("usage", {}).get("completion_tokens", 0)), None
        except (httpx.HTTPError, ValueError) as exc:
            return time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}"


async def run_load_async(
    base_url: str, model: str, *, requests: int = 64, concurrency: int = 64,
    max_tokens: int = 64, prompt: str = DEFAULT_PROMPT, timeout_s: float = 300,
    exact_tokens: bool = True,
) -> LoadResult:
    payload: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0.0,
    }
    if exact_tokens:  # vLLM extension: generate exactly max_tokens, so runs compare like for like
        payload |= {"ignore_eos": True, "min_tokens": max_tokens}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[
            _one(client, f"{base_url}/v1/chat/completions", payload, sem)
            for _ in range(requests)
        ])
        wall = time.perf_counter() - started
    ok = [r for r in results if r[2] is None]
    latencies = [r[0] for r in ok]
    tokens = sum(r[1] for r in ok)
    errors = [r[2] for r in results if r[2] is not None]
    return LoadResult(
        requests=requests, concurrency=concurrency, errors=len(errors), wall_s=round(wall, 3),
        p50_s=_round(statistics.median(latencies) if latencies else None),
        p95_s=_round(percentile(latencies, 95)), max_s=_round(max(latencies, default=None)),
        completion_tokens=tokens, tokens_per_s=round(tokens / wall, 2) if wall else 0.0,
        requests_per_s=round(len(ok) / wall, 3) if wall else 0.0,
        error_samples=tuple(errors[:5]),
    )


def run_load(base_url: str, model: str, **kwargs: Any) -> LoadResult:
    return asyncio.run(run_load_async(base_url, model, **kwargs))


def run_configured_load(base_url: str, model: str, load: LoadSettings) -> LoadResult:
    """The load a setting describes (``rollout.slo``, ``search.load``), read in one place so a
    deployment's check and a search's throughput are measured alike."""
    return run_load(base_url, model, requests=load.requests, concurrency=load.concurrency,
                    max_tokens=load.max_tokens, timeout_s=load.timeout_s)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
