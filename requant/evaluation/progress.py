"""Requests done of total while lm-eval runs against a vLLM server.

The total is what lm-eval hands its model (a subclass of lm-eval's own ``local-completions``
model notes the size of each request list it is given); the count done is the server's own
``vllm:request_success_total`` from its Prometheus ``/metrics``, polled in the background. Both
are public interfaces: nothing inside lm-eval or vLLM is patched.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from requant.progress import Report, eta_text

_SUCCESS = re.compile(r"^vllm:request_success_total\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)


def finished_requests(base_url: str, timeout_s: float = 5.0) -> int:
    """Requests the server has finished since it started (all finish reasons)."""
    text = httpx.get(f"{base_url}/metrics", timeout=timeout_s).text
    return int(sum(float(v) for v in _SUCCESS.findall(text)))


class RequestCounter:
    """Shared between the counting model (totals) and the poller (done)."""

    def __init__(self, base_url: str, label: str, report: Report) -> None:
        self.base_url, self.label, self.report = base_url, label, report
        self.total = 0
        self.started = time.monotonic()
        self.offset = finished_requests(base_url)

    def add_total(self, n: int) -> None:
        self.total += n

    def poll(self) -> None:
        done = finished_requests(self.base_url) - self.offset
        if self.total <= 0:
            self.report(0.0, f"{self.label}: {done} requests done, preparing the rest")
            return
        fraction = min(done / self.total, 1.0)
        self.report(fraction, f"{self.label}: {done} of {self.total} requests, "
                    f"{eta_text(self.started, fraction)}")


def counting_completions_model(counter: RequestCounter, **model_args: Any) -> Any:
    """lm-eval's ``local-completions`` model that tells ``counter`` how many requests come."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class CountingCompletions(LocalCompletionsAPI):
        def generate_until(self, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
            counter.add_total(len(requests))
            return super().generate_until(requests, *args, **kwargs)

        def loglikelihood(self, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
            counter.add_total(len(requests))
            return super().loglikelihood(requests, *args, **kwargs)

    return CountingCompletions(**model_args)
