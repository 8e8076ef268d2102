"""Checks a new deployment must pass before any client traffic reaches it.

Three steps, cheapest first, each a plain function so the rollout of every target and the tests
call the same code: readiness (``/health``, then ``/v1/models`` lists the served name), a smoke
test (a temperature-0 chat completion returns a well-formed answer), and the seed's load test
(64 concurrent requests x 64 tokens) judged against the SLO settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from requant.errors import DeploymentCheckFailed
from requant.serving.loadtest import LoadResult, run_configured_load
from requant.settings import SLOSettings


@dataclass
class DeploymentCheckReport:
    readiness_s: float | None = None
    smoke: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    slo_violations: list[str] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def not_ready_reason(client: httpx.Client, base_url: str, served_name: str) -> str | None:
    """None when the server is ready (``/health`` is 200 and ``/v1/models`` lists the served
    name); otherwise why not. The one readiness rule for evaluation servers and rollouts."""
    try:
        health = client.get(f"{base_url}/health")
        if health.status_code != 200:
            return f"/health answered {health.status_code}"
        names = [m.get("id") for m in client.get(f"{base_url}/v1/models").json().get("data", [])]
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if served_name in names else f"/v1/models lists {names}, not {served_name!r}"


def wait_until_ready(base_url: str, served_name: str, timeout_s: float,
                     alive: Any = None, interval_s: float = 1.0) -> float:
    """Poll until ready; ``alive()`` (optional) aborts early when the server died."""
    started = time.monotonic()
    with httpx.Client(timeout=5) as client:
        while True:
            if alive is not None and not alive():
                raise DeploymentCheckFailed("readiness", "the server process exited")
            reason = not_ready_reason(client, base_url, served_name)
            if reason is None:
                return round(time.monotonic() - started, 2)
            if time.monotonic() - started > timeout_s:
                raise DeploymentCheckFailed("readiness",
                                         f"not ready after {timeout_s:.0f} s ({reason})")
            time.sleep(interval_s)


def smoke_test(base_url: str, served_name: str, prompt: str, timeout_s: float = 120
               ) -> dict[str, Any]:
    """One deterministic chat completion: the model loads, generates, and speaks the API."""
    try:
        with httpx.Client(timeout=timeout_s) as client:
            models = client.get(f"{base_url}/v1/models").json()
            names = [m.get("id") for m in models.get("data", [])]
            if served_name not in names:
                raise DeploymentCheckFailed("smoke",
                                            f"/v1/models lists {names}, not {served_name!r}")
            response = client.post(f"{base_url}/v1/chat/completions", json={
                "model": served_name, "temperature": 0.0, "max_tokens": 16,
                "messages": [{"role": "user", "content": prompt}],
            })
    except httpx.HTTPError as exc:
        raise DeploymentCheckFailed("smoke", f"{type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise DeploymentCheckFailed("smoke", f"chat completion answered HTTP "
                                    f"{response.status_code}: {response.text[:300]}")
    body = response.json()
    problems = well_formed_problems(body, served_name)
    if problems:
        raise DeploymentCheckFailed("smoke", "; ".join(problems), {"response": body})
    choice = body["choices"][0]
    return {"model": body["model"], "answer": choice["message"]["content"],
            "finish_reason": choice["finish_reason"], "usage": body["usage"],
            "root": next((m.get("root") for m in models["data"] if m.get("id") == served_name),
                         None)}


def well_formed_problems(body: Any, served_name: str) -> list[str]:
    """What is wrong with a chat completion response (empty list: nothing)."""
    if not isinstance(body, dict):
        return ["response is not a JSON object"]
    problems = []
    if body.get("object") != "chat.completion":
        problems.append(f"object is {body.get('object')!r}, not 'chat.completion'")
    if body.get("model") != served_name:
        problems.append(f"model is {body.get('model')!r}, not {served_name!r}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return [*problems, "no choices"]
    message = choices[0].get("message") or {}
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        problems.append("choices[0].message is not an assistant message with text content")
    elif not message["content"].strip():
        problems.append("the answer is empty")
    if choices[0].get("finish_reason") not in {"stop", "length"}:
        problems.append(f"finish_reason is {choices[0].get('finish_reason')!r}")
    usage = body.get("usage") or {}
    if not isinstance(usage.get("completion_tokens"), int) or usage["completion_tokens"] < 1:
        problems.append("usage.completion_tokens is missing or zero")
    return problems


def slo_violations(load: LoadResult, slo: SLOSettings) -> list[str]:
    """Each SLO the load test missed, as a sentence naming the setting it broke."""
    out = []
    if load.error_rate > slo.max_error_rate:
        sample = f" (e.g. {load.error_samples[0]})" if load.error_samples else ""
        out.append(f"error rate {load.error_rate:.3f} > rollout.slo.max_error_rate "
                   f"{slo.max_error_rate}{sample}")
    if slo.max_p95_latency_s is not None:
        if load.p95_s is None:
            out.append("no request succeeded, so p95 latency is undefined")
        elif load.p95_s > slo.max_p95_latency_s:
            out.append(f"p95 latency {load.p95_s:.3f} s > rollout.slo.max_p95_latency_s "
                       f"{slo.max_p95_latency_s}")
    if slo.min_tokens_per_s is not None and load.tokens_per_s < slo.min_tokens_per_s:
        out.append(f"throughput {load.tokens_per_s:.1f} tok/s < rollout.slo.min_tokens_per_s "
                   f"{slo.min_tokens_per_s}")
    return out


def load_test(base_url: str, served_name: str, slo: SLOSettings) -> tuple[LoadResult, list[str]]:
    result = run_configured_load(base_url, served_name, slo)
    return result, slo_violations(result, slo)


def verify_deployment(base_url: str, served_name: str, slo: SLOSettings, smoke_prompt: str,
                      ready_timeout_s: float, alive: Any = None) -> DeploymentCheckReport:
    """Readiness -> smoke -> load test against the SLOs; raises DeploymentCheckFailed on the first
    check that fails, with what was measured so far attached."""
    report = DeploymentCheckReport()
    report.readiness_s = wait_until_ready(base_url, served_name, ready_timeout_s, alive)
    report.smoke = smoke_test(base_url, served_name, smoke_prompt)
    if alive is not None and not alive():
        raise DeploymentCheckFailed("smoke", "the server process exited", report.as_record())
    load, violations = load_test(base_url, served_name, slo)
    report.load, report.slo_violations = load.as_record(), violations
    if alive is not None and not alive():
        raise DeploymentCheckFailed("load", "the server process exited during the load test",
                                 report.as_record())
    if violations:
        raise DeploymentCheckFailed("load", "; ".join(violations), report.as_record())
    return report
