"""What a run may choose, and what only the worker's operator may (docs/trust.md).

Anyone who can open the Prefect UI can start a run with parameters of their choosing, and the
run executes on a worker that holds the team's secrets (the Hub write token, cluster
credentials) and runs processes (vLLM servers) with its rights. So a setting that decides where
a secret goes, which executable or image runs, what environment or flags a process gets, or
whether a model's own code runs, is not the run's to choose: it must be the worker's default or
on an allowlist the worker's operator sets in the worker's environment. This check runs when
settings are validated (``validate_settings``: the CLI, and the start of every flow, on the
worker), before anything is fetched, written or started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from requant.errors import SettingsError
from requant.settings import PipelineSettings

#: vLLM flags a run may add (extra_args): performance and numerics only. Anything that reads a
#: file, loads code, opens a port or changes what is served needs the operator's REQUANT_VLLM_ARGS.
SAFE_VLLM_FLAGS = frozenset({
    "--dtype", "--kv-cache-dtype", "--block-size", "--seed", "--max-num-batched-tokens",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--swap-space", "--max-seq-len-to-capture",
    "--disable-log-requests", "--disable-log-stats", "--num-scheduler-steps",
})
#: Environment a run may give a vLLM server: sizes and kernels, nothing that loads code
#: (LD_PRELOAD, PYTHONPATH, ...). The operator adds names with REQUANT_SERVER_ENV_KEYS.
SAFE_SERVER_ENV = frozenset({
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_ATTENTION_BACKEND", "VLLM_BATCH_INVARIANT", "VLLM_LOGGING_LEVEL", "OMP_NUM_THREADS",
})
DEFAULT_TOKEN_SECRETS = frozenset({"hf-token"})


def check_run_policy(settings: PipelineSettings,
                     env: Mapping[str, str] | None = None) -> None:
    """Refuse, naming each field and who can allow it, what this worker does not allow."""
    env = os.environ if env is None else env
    problems = list(_problems(settings, env))
    if problems:
        raise SettingsError("settings this worker does not allow a run to choose:\n  - "
                            + "\n  - ".join(problems))


def allowed_hub_endpoints(env: Mapping[str, str]) -> set[str]:
    default = env.get("HF_ENDPOINT") or "https://huggingface.co"
    return {_url(u) for u in [default, *_items(env, "REQUANT_HUB_ENDPOINTS")]}


def _problems(s: PipelineSettings, env: Mapping[str, str]) -> Iterator[str]:
    if s.hub.endpoint and _url(s.hub.endpoint) not in (ok := allowed_hub_endpoints(env)):
        yield (f"hub.endpoint: {s.hub.endpoint} is not a Hub this worker sends its token to "
               f"({', '.join(sorted(ok))}). Unset it, or the worker's operator adds it to "
               "REQUANT_HUB_ENDPOINTS.")
    secrets = DEFAULT_TOKEN_SECRETS | set(_items(env, "REQUANT_HUB_TOKEN_SECRETS"))
    if s.hub.token_secret and s.hub.token_secret not in secrets:
        yield (f"hub.token_secret: {s.hub.token_secret!r} is not a secret this worker lets "
               f"runs use ({', '.join(sorted(secrets))}). Use one of those, or the worker's "
               "operator adds it to REQUANT_HUB_TOKEN_SECRETS.")
    if s.source.trust_remote_code and env.get("REQUANT_ALLOW_REMOTE_CODE") != "1":
        yield ("source.trust_remote_code: would run the model repo's own Python on this worker. "
               "Set it false, or the worker's operator sets REQUANT_ALLOW_REMOTE_CODE=1.")
    servers = {"evaluation.server": s.evaluation.server,
               "rollout.local.server": s.rollout.local.server}
    env_keys = SAFE_SERVER_ENV | set(_items(env, "REQUANT_SERVER_ENV_KEYS"))
    for where, server in servers.items():
        if bad := sorted(set(server.env) - env_keys):
            yield (f"{where}.env: {', '.join(bad)} may not be set by a run (allowed: "
                   f"{', '.join(sorted(env_keys))}). Remove them, or the worker's operator "
                   "adds them to REQUANT_SERVER_ENV_KEYS.")
    flags = SAFE_VLLM_FLAGS | set(_items(env, "REQUANT_VLLM_ARGS"))
    args = {f"{w}.extra_args": srv.extra_args for w, srv in servers.items()}
    args["rollout.kubernetes.extra_args"] = s.rollout.kubernetes.extra_args
    for where, given in args.items():
        if bad := sorted({a.split("=", 1)[0] for a in given if a.startswith("-")} - flags):
            yield (f"{where}: {', '.join(bad)} may not be passed by a run (allowed: "
                   f"{', '.join(sorted(flags))}). Remove them, or the worker's operator adds "
                   "them to REQUANT_VLLM_ARGS.")
    yield from _kubernetes_problems(s, env)


def _kubernetes_problems(s: PipelineSettings, env: Mapping[str, str]) -> Iterator[str]:
    k = s.rollout.kubernetes
    for where, section in (("rollout.kubernetes", k), ("rollout.kubernetes.router", k.router)):
        images = {type(section).model_fields["image"].default, *_items(env, "REQUANT_K8S_IMAGES")}
        if section.image not in images:
            yield (f"{where}.image: {section.image} is not an image this worker deploys "
                   f"({', '.join(sorted(images))}). Use one of those, or the worker's operator "
                   "adds it to REQUANT_K8S_IMAGES.")
    configs = set(_items(env, "REQUANT_KUBECONFIGS"))
    if k.kubeconfig is not None and str(k.kubeconfig) not in configs:
        yield (f"rollout.kubernetes.kubeconfig: {k.kubeconfig} names cluster credentials on "
               "this worker, which a run may not pick. Unset it (in-cluster config or the "
               "worker's ~/.kube/config), or the worker's operator adds it to "
               "REQUANT_KUBECONFIGS.")


def _items(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def _url(url: str) -> str:
    return url.strip().rstrip("/")
