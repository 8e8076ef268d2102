"""Run parameters are untrusted (docs/trust.md): whoever can start a run from the Prefect UI
cannot send the worker's Hub token elsewhere, pick an executable, an image, cluster
credentials, a server's environment or flags, or run a model's own code, unless the worker's
operator allowed it. Each refusal names the field and happens before any work."""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from requant.cli import main
from requant.errors import EXIT_BAD_INPUT, SettingsError
from requant.policy import check_run_policy
from requant.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
REQUANT = str(Path(os.sys.executable).parent / "requant")
DEMO = "deployments/configs/demo.yaml"
TOKEN = "hf_workerWriteToken0123456789abcdef"


class Listener:
    """A local server standing in for an attacker's host: it records whatever reaches it."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            do_POST = do_HEAD = do_PUT = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.mark.parametrize("command", [
    ["promote", "--revision", "a" * 40],
    ["run"],
])
def test_a_run_naming_another_hub_endpoint_gets_no_token_and_exits_2_before_any_work(
        listener, tmp_path, command):
    """The report's exact attack, through the console script as an operator types it, with the
    worker's token in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "PREFECT_API_URL")}
    env |= {"HF_TOKEN": TOKEN}
    proc = subprocess.run(
        [REQUANT, *command, "--config", str(ROOT / DEMO), "--set", "hub.repo_id=someone/model",
         "--set", f"hub.endpoint={listener.url}", "--set", f"output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert listener.seen == []  # nothing, let alone the token, reached the other host
    assert f"hub.endpoint: {listener.url} is not a Hub this worker sends its token to" \
        in proc.stderr
    assert "REQUANT_HUB_ENDPOINTS" in proc.stderr and "Traceback" not in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


def test_the_flows_refuse_it_too_when_started_from_the_ui_with_the_workers_environment(
        listener, tmp_path, monkeypatch):
    """A UI run reaches the flow function with its parameters, not through the CLI."""
    from requant.flows.promote import promote
    from requant.flows.requantize import requantize

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    settings = load_settings(ROOT / DEMO, [f"hub.endpoint={listener.url}",
                                           "hub.repo_id=someone/model",
                                           f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(SettingsError, match=r"hub\.endpoint: .* REQUANT_HUB_ENDPOINTS"):
        requantize.fn(settings)
    with pytest.raises(SettingsError, match=r"hub\.endpoint"):
        promote.fn(settings, revision="b" * 40)
    assert listener.seen == [] and not (tmp_path / "runs").exists()


RESTRICTED = [
    ("hub.token_secret=team-admin-token", "hub.token_secret", "REQUANT_HUB_TOKEN_SECRETS",
     "team-admin-token"),
    ("source.trust_remote_code=true", "source.trust_remote_code", "REQUANT_ALLOW_REMOTE_CODE",
     "1"),
    ("evaluation.server.env={LD_PRELOAD: /tmp/x.so}", "evaluation.server.env",
     "REQUANT_SERVER_ENV_KEYS", "LD_PRELOAD"),
    ("rollout.local.server.env={PYTHONPATH: /tmp/evil}", "rollout.local.server.env",
     "REQUANT_SERVER_ENV_KEYS", "PYTHONPATH"),
    ("evaluation.server.extra_args=[--chat-template, /etc/shadow]",
     "evaluation.server.extra_args", "REQUANT_VLLM_ARGS", "--chat-template"),
    ("rollout.local.server.extra_args=['--trust-remote-code']",
     "rollout.local.server.extra_args", "REQUANT_VLLM_ARGS", "--trust-remote-code"),
    ("rollout.kubernetes.extra_args=['--api-key=x']", "rollout.kubernetes.extra_args",
     "REQUANT_VLLM_ARGS", "--api-key"),
    ("rollout.kubernetes.image=evil/miner:latest", "rollout.kubernetes.image",
     "REQUANT_K8S_IMAGES", "evil/miner:latest"),
    ("rollout.kubernetes.kubeconfig=/root/.kube/admin", "rollout.kubernetes.kubeconfig",
     "REQUANT_KUBECONFIGS", "/root/.kube/admin"),
    ("rollout.kubernetes.router.image=evil/router:latest", "rollout.kubernetes.router.image",
     "REQUANT_K8S_IMAGES", "evil/router:latest"),
]


@pytest.mark.parametrize("override,field,variable,allow", RESTRICTED,
                         ids=[r[1] for r in RESTRICTED])
def test_each_setting_only_the_worker_may_choose_is_refused_naming_it_unless_allowed(
        override, field, variable, allow, monkeypatch, capsys, tmp_path):
    for name in {r[2] for r in RESTRICTED}:
        monkeypatch.delenv(name, raising=False)
    args = ["status", "--set", override, "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "rollout.local.port=1",
            "--set", f"rollout.state_dir={tmp_path / 'state'}"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"  - {field}:" in err and variable in err and "Traceback" not in err
    monkeypatch.setenv(variable, allow)  # the operator allows it: the same run is accepted
    check_run_policy(load_settings(None, [override]))


def test_safe_defaults_and_safe_tuning_need_no_allowlist(monkeypatch):
    for name in ("REQUANT_VLLM_ARGS", "REQUANT_SERVER_ENV_KEYS", "REQUANT_HUB_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.internal.example/")
    check_run_policy(load_settings(ROOT / DEMO))
    check_run_policy(load_settings(ROOT / "deployments/configs/production-llama3-8b.yaml"))
    check_run_policy(load_settings(None, [
        "hub.endpoint=https://hub.internal.example", "hub.token_secret=hf-token",
        "evaluation.server.extra_args=[--dtype, bfloat16, '--max-num-batched-tokens=4096']",
        "evaluation.server.env={VLLM_CPU_KVCACHE_SPACE: '8', VLLM_BATCH_INVARIANT: '1'}"]))


def test_the_serving_python_is_no_setting_a_run_could_change():
    with pytest.raises(SettingsError, match=r"evaluation\.server\.python: Extra inputs"):
        load_settings(None, ["evaluation.server.python=/tmp/evil/python"])


@pytest.mark.parametrize("override", [
    "rollout.kubernetes.router.admin_url=http://evil.example",
    "rollout.kubernetes.router.slot_url=http://evil.example/{service}"])
def test_where_the_routers_token_and_live_traffic_go_is_no_setting_a_run_could_change(
        override):
    """The worker's operator sets REQUANT_K8S_ROUTER_ADMIN_URL and REQUANT_K8S_SLOT_URL."""
    with pytest.raises(SettingsError, match=r"Extra inputs"):
        load_settings(None, [override])


def test_every_shipped_deployment_passes_the_policy_of_a_worker_with_defaults(monkeypatch):
    """What prefect.yaml ships runs on a worker whose operator allowed nothing extra."""
    import yaml

    from requant.settings import validate_settings

    for name in ("REQUANT_HUB_ENDPOINTS", "REQUANT_K8S_IMAGES", "REQUANT_VLLM_ARGS",
                 "REQUANT_HUB_TOKEN_SECRETS", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    checked = 0
    for deployment in deployments:
        params = (deployment.get("parameters") or {}).get("settings")
        if params:
            check_run_policy(validate_settings(params))
            checked += 1
    assert checked >= 2
