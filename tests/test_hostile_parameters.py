"""A run chooses only what a run may choose (docs/trust.md): every hostile parameter of the
report, through the real entry points (`requant run|promote --set`, the flows, a deployment on a
real Prefect server), ends before any effect: exit 2, the field named with who sets it, and
nothing executed, sent, killed, replaced or uploaded (asserted: a listener, a decoy process
group, the strict test API server's request log, the fake Hub's commits, the output folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from requant.errors import EXIT_BAD_INPUT, NotOurs, SecretInCommit, SettingsError
from requant.run_request import RunRequest, operator_fields, request_fields
from tests.conftest import ROOT, wait_until

REQUANT = str(Path(sys.executable).parent / "requant")
TOKEN = "hf_workerWriteToken0123456789abcdef"
OPERATOR = "the worker's operator sets it"


class Listener:
    """A server on this host standing in for another host: it records every request, and its
    ``/-/status`` claims to be a router whose pid is ``claimed_pid``."""

    def __init__(self, claimed_pid: int | None = None) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                seen.append({"method": self.command, "path": self.path,
                             "headers": {k.lower(): v for k, v in self.headers.items()},
                             "body": len(self.rfile.read(length))})
                body = json.dumps({"pid": claimed_pid, "backend": None}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def decoy():
    """A process group of somebody else's that nothing of requant's may signal."""
    from requant.processes import runs_command

    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    # its command line reads empty for a moment inside exec: a check before it shows would not
    # be tested against a real "sleep 600" (and the test's own check of it would race)
    wait_until(lambda: runs_command(proc.pid, "sleep", "600"), 10, "the decoy's command line")
    yield proc
    assert proc.poll() is None, "the decoy process group was signalled"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def listener(decoy):
    server = Listener(claimed_pid=decoy.pid)
    yield server
    server.close()


def operator_profile(tmp_path: Path, **sections) -> Path:
    """A profile of the worker's operator: the demo with this test's folders and port."""
    data = yaml.safe_load((ROOT / "deployments/configs/demo.yaml").read_text())
    data.update({"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")})
    data["rollout"] = {**data["rollout"], "state_dir": str(tmp_path / "state")}
    data["source"] = {**data["source"], "model": str(ROOT / "models/SmolLM2-135M-Instruct")}
    data["calibration"] = {**data["calibration"],
                           "dataset": str(ROOT / "data/calibration/gsm8k-chat-1k.jsonl")}
    data["evaluation"] = {**data["evaluation"], "task_dir": str(ROOT / "deployments/lm_eval_tasks")}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def requant(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script as an operator (or a wrapper a UI user drives) types it, with the
    worker's token in its environment and no Prefect server."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "PREFECT_API_URL")}
    env |= {"HF_TOKEN": TOKEN}
    return subprocess.run([REQUANT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def hostile_task_folder(tmp_path: Path) -> Path:
    """A task folder whose YAML includes a file outside it that runs Python (`!function`)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')\n"
                                     "def docs(d):\n    return d\n")
    (outside / "base.yaml").write_text("process_docs: !function evil.docs\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: gsm8k_local\ninclude: ../elsewhere/base.yaml\n")
    return tasks


#: (--set item, the field the refusal names); {listener} and {tasks} are filled in per test.
HOSTILE_SETS = [
    ("rollout.served_model_name=--trust-remote-code.x", "rollout.served_model_name"),
    ("evaluation.task_dir={tasks}", "evaluation.task_dir"),
    ("output_dir=/tmp/a,trust_remote_code=True", "output_dir"),
    ("cache_dir=/", "cache_dir"),
    ("rollout.local.port={port}", "rollout.local.port"),
    ("rollout.local.host=0.0.0.0", "rollout.local.host"),
    ("rollout.state_dir=/etc", "rollout.state_dir"),
    ("rollout.target=kubernetes", "rollout.target"),
    ("rollout.kubernetes.namespace=kube-system", "rollout.kubernetes.namespace"),
    ("rollout.kubernetes.deployment=coredns", "rollout.kubernetes.deployment"),
    ("rollout.kubernetes.context=prod-admin", "rollout.kubernetes.context"),
    ("rollout.kubernetes.hf_token_secret=prod-db", "rollout.kubernetes.hf_token_secret"),
    ("rollout.kubernetes.model_cache_pvc=prod-data", "rollout.kubernetes.model_cache_pvc"),
    ("rollout.kubernetes.image=evil/miner:latest", "rollout.kubernetes.image"),
    ("rollout.kubernetes.kubeconfig=/root/.kube/admin", "rollout.kubernetes.kubeconfig"),
    ("evaluation.server.host=0.0.0.0", "evaluation.server.host"),
    ("rollout.local.server.host=0.0.0.0", "rollout.local.server.host"),
    ("evaluation.server.env={{LD_PRELOAD: /tmp/x.so}}", "evaluation.server.env"),
    ("rollout.local.server.extra_args=[--trust-remote-code]",
     "rollout.local.server.extra_args"),
    ("hub.endpoint={listener}", "hub.endpoint"),
    ("hub.token_secret=team-admin-token", "hub.token_secret"),
    ("hub.repo_id=someone/model", "hub.repo_id"),
    ("source.trust_remote_code=true", "source.trust_remote_code"),
    ("calibration.dataset=/proc/self/environ", "calibration.dataset"),
    ("evaluation.tasks=[gsm8k]", "evaluation.tasks"),
    ("quantization.ignore=[lm_head, 're:.*']", "quantization.ignore"),
]


@pytest.mark.parametrize("item,field", HOSTILE_SETS, ids=[f for _, f in HOSTILE_SETS])
@pytest.mark.parametrize("command", ["run", "promote"])
def test_a_run_naming_anything_of_the_operators_exits_2_naming_it_before_any_effect(
        item, field, command, listener, decoy, tmp_path):
    profile = operator_profile(tmp_path, rollout={"local": {"port": listener.port}})
    item = item.format(listener=listener.url, port=listener.port,
                       tasks=hostile_task_folder(tmp_path))
    args = ["--config", str(profile), "--set", item]
    if command == "promote":
        (tmp_path / "runs" / "r1" / "checkpoint").mkdir(parents=True)
        args += ["--checkpoint", str(tmp_path / "runs" / "r1" / "checkpoint"), "--force"]
    proc = requant(command, *args, cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert f"error: {field}: {OPERATOR}" in proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stdout + proc.stderr
    assert listener.seen == []  # nothing sent: no token, no admin call, no status probe
    assert not (tmp_path / "PWNED").exists()  # nothing executed
    assert sorted(p.name for p in (tmp_path / "runs").glob("*")) == (
        ["r1"] if command == "promote" else [])  # no run folder, nothing written
    assert not (tmp_path / "state").exists()  # no router started, no supervisord.conf


@pytest.mark.parametrize("item,field,offered", [
    ("source.model=/etc", "source.model", "names the worker's profile offers"),
    ("source.model=../../../../root", "source.model", "names the worker's profile offers"),
    ("source.model=other/model", "source.model", "choose one of SmolLM2-135M-Instruct"),
    ("quantization.recipe=w8a8-secret", "quantization.recipe", "the catalog has"),
    ("calibration.num_samples=5000", "calibration.num_samples", "at most 1024"),
    ("gate.min_recovery=0.5", "gate.min_recovery", "only be stricter"),
    ("gate.confidence=0.6", "gate.confidence", "only be stricter"),
    ("search.candidates=[w8a8-evil]", "search.candidates", "the profile's candidates"),
    ("profile=../../etc/requant", "profile", "is not a profile name"),
])
def test_a_bounded_value_the_profile_does_not_offer_is_refused_with_what_it_offers(
        item, field, offered, tmp_path):
    proc = requant("run", "--config", str(operator_profile(tmp_path)), "--set", item,
                   cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert field in proc.stderr and "Traceback" not in proc.stderr
    if field != "profile":  # a name that is no name fails the request's own pattern
        assert offered in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_path_as_recipe_is_no_catalog_name_and_is_never_read(tmp_path):
    secret = tmp_path / "kubeconfig"
    secret.write_text("token: sk-prodAdminToken0123456789abcdefgh\n")
    proc = requant("run", "--config", str(operator_profile(tmp_path)), "--set",
                   f"quantization.recipe={secret}", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "quantization.recipe" in proc.stderr and "sk-prod" not in proc.stderr


def test_a_promote_deploys_only_checkpoints_from_the_profiles_folders(tmp_path, listener):
    elsewhere = tmp_path / "carrying-its-own-python"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text('{"model_type": "x", "auto_map": {}}')
    proc = requant("promote", "--config", str(operator_profile(tmp_path)), "--checkpoint",
                   str(elsewhere), "--force", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "checkpoint:" in proc.stderr and str(tmp_path / "runs") in proc.stderr
    link = tmp_path / "runs" / "link"
    link.parent.mkdir()
    link.symlink_to(elsewhere)  # a symbolic link out of the folder is followed, then refused
    proc = requant("promote", "--config", str(operator_profile(tmp_path)), "--checkpoint",
                   str(link), "--force", cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT and "checkpoint:" in proc.stderr
    assert listener.seen == [] and not (tmp_path / "state").exists()


def test_the_flows_refuse_the_same_when_a_ui_run_reaches_them_with_parameters(tmp_path):
    """A deployment run reaches the flow with its parameters as a dict, not through the CLI."""
    from requant.flows.promote import promote
    from requant.flows.requantize import requantize
    from requant.profile import load_file, using

    hostile = {"rollout": {"local": {"port": 1}}}
    with using(load_file(operator_profile(tmp_path))):
        with pytest.raises(SettingsError, match=rf"rollout\.local\.port: {OPERATOR}"):
            requantize.fn(hostile)
        with pytest.raises(SettingsError, match=r"checkpoint: '/etc' is not offered"):
            promote.fn({}, checkpoint="/etc", force=True)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "state").exists()


# ---- the form a UI user fills in ------------------------------------------------------------


def _leaves(schema: dict, node: dict, path: str = ""):
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node, **node["allOf"][0]}
        return (yield from _leaves(schema, node, path))
    if node.get("type") == "object" and "properties" in node:
        for name, sub in node["properties"].items():
            yield from _leaves(schema, sub, f"{path}.{name}".lstrip("."))
        return
    yield path, node


def _bounded(node: dict) -> bool:
    options = node.get("anyOf", [node])
    real = [o for o in options if o.get("type") != "null"]

    def one(o: dict) -> bool:
        if "enum" in o or "const" in o or o.get("type") == "boolean":
            return True
        if o.get("type") == "string":
            return "pattern" in o
        if o.get("type") in ("integer", "number"):
            return any(k in o for k in ("maximum", "exclusiveMaximum")) and any(
                k in o for k in ("minimum", "exclusiveMinimum"))
        if o.get("type") == "array":
            return "maxItems" in o and (one(o["items"]) or o["items"].get("type") == "string")
        return False

    return bool(real) and all(one(o) for o in real)


@pytest.mark.parametrize("flow_name", ["requantize", "promote"])
def test_every_field_of_the_ui_form_has_a_bound_or_an_enum_and_none_is_the_operators(
        flow_name):
    """The deployment's parameter schema as Prefect renders the form."""
    from prefect.utilities.callables import parameter_schema

    from requant.flows.promote import promote
    from requant.flows.requantize import requantize

    flow = {"requantize": requantize, "promote": promote}[flow_name]
    schema = parameter_schema(flow).model_dump()
    leaves = dict(_leaves(schema, schema))
    unbounded = [p for p, node in leaves.items() if not _bounded(node)]
    assert unbounded == [], f"fields without a bound or enum: {unbounded}"
    names = {p.removeprefix("request.") for p in leaves}
    assert names & set(operator_fields()) == set()
    assert "request.profile" in leaves and "settings" not in schema["properties"]
    if flow_name == "requantize":
        assert list(schema["properties"]) == ["request"]
        assert {f"request.{f}" for f in request_fields()} == set(leaves)


def test_the_request_names_no_path_host_port_flag_image_namespace_or_secret():
    words = ("dir", "path", "host", "port", "url", "endpoint", "image", "namespace", "secret",
             "token", "kubeconfig", "context", "env", "args", "pvc", "dataset", "task")
    assert [f for f in request_fields() if any(w in f.split(".")[-1] for w in words)] == []


def test_every_shipped_deployment_sends_only_a_run_request():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for d in deployments:
        params = d.get("parameters") or {}
        assert "settings" not in params, d["name"]
        if "request" in params:
            RunRequest.model_validate(params["request"])
    trigger = next(d for d in deployments if d["name"] == "promote")["triggers"][0]
    assert set(trigger["parameters"]) == {"request", "revision", "checkpoint"}


# ---- Prefect: a custom run cannot widen its job -----------------------------------------------


def test_locked_job_templates_leave_a_run_only_its_name_and_labels():
    from requant.job_template import lock, open_variables

    for path in sorted((ROOT / "deployments/work-pools").glob("*.json")):
        locked = lock(json.loads(path.read_text()))
        assert open_variables(locked) == [], path.name
        assert locked["variables"]["additionalProperties"] is False
        assert set(locked["variables"]["properties"]) <= {"name", "labels"}
        assert locked["job_configuration"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


def test_a_deployment_run_with_hostile_parameters_or_job_variables_is_refused_by_the_server(
        prefect_server, tmp_path):
    """On a real Prefect server, as the UI's Custom run creates it: parameters outside the run
    request, and job variables (env, command, working dir) over a locked pool, never become a
    flow run; the profile's location is no parameter and no environment variable either."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    from requant.flows.requantize import requantize
    from requant.job_template import lock

    template = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "work-pool",
         "get-default-base-job-template", "--type", "process"],
        capture_output=True, text=True, check=True, timeout=120).stdout)
    pool = f"locked-{tmp_path.name[-12:]}".lower().replace("_", "-")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=lock(template)))
    deployment_id = requantize.to_deployment(name=pool, work_pool_name=pool).apply()
    name = f"requantize/{pool}"
    hostile = [
        {"parameters": {"request": {"rollout": {"local": {"port": 1}}}}},
        {"parameters": {"request": {"profile": "../../../tmp/evil"}}},
        {"parameters": {"request": {"calibration": {"num_samples": 10**9}}}},
        {"job_variables": {"env": {"REQUANT_PROFILE": str(tmp_path), "PYTHONPATH": "/tmp"}}},
        {"job_variables": {"command": "touch /tmp/PWNED"}},
        {"job_variables": {"working_dir": str(tmp_path)}},
    ]
    for attempt in hostile:
        with pytest.raises((PrefectHTTPStatusError, httpx.HTTPStatusError)) as err:
            run_deployment(name, timeout=0, **attempt)
        assert err.value.response.status_code in (409, 422), attempt
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    assert [r for r in runs if r.deployment_id == deployment_id] == []
    ok = run_deployment(name, parameters={"request": {"calibration": {"num_samples": 8}}},
                        timeout=0)  # a bounded request is accepted (and waits for a worker)
    assert ok.parameters["request"]["calibration"]["num_samples"] == 8
    # a parameter the flow does not have (the old whole-settings form) is stored by the server,
    # but the engine binds parameters to the signature before the flow's body: refused there
    from prefect.exceptions import ParameterBindError
    from prefect.utilities.callables import get_call_parameters

    with pytest.raises(ParameterBindError, match="settings"):
        get_call_parameters(requantize.fn, (), {"settings": {"output_dir": "/"}})


def test_a_flow_run_finds_its_profile_by_name_on_the_worker_never_from_its_environment(
        monkeypatch, tmp_path):
    from requant.profile import BUNDLED_PROFILES, load_named, profile_dir

    for name in ("REQUANT_PROFILE", "REQUANT_PROFILE_DIR", "REQUANT_PROJECT_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    (tmp_path / "demo.yaml").write_text("output_dir: /\n")
    assert profile_dir() == BUNDLED_PROFILES or profile_dir() == Path("/etc/requant/profiles")
    demo = load_named("demo")
    assert demo.settings.output_dir == ROOT / "runs"  # the worker's file, resolved in its root
    on_demand = load_named("on-demand")
    assert on_demand.settings.rollout.trigger == "automation"
    assert on_demand.settings.source == demo.settings.source  # extends: demo


# ---- the local target: no pid from HTTP, no token to anyone else ------------------------------


def test_requant_down_signals_no_pid_an_answer_or_a_planted_pid_file_names(
        listener, decoy, tmp_path):
    profile = operator_profile(tmp_path, rollout={"local": {"port": listener.port}})
    folder = tmp_path / "state" / "local"
    folder.mkdir(parents=True)
    (folder / "router.pid").write_text(f"{decoy.pid}\n")  # a pid file pointing elsewhere
    proc = requant("down", "--config", str(profile), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert decoy.poll() is None  # the fixture asserts it again at the end
    assert not any("authorization" in r["headers"] for r in listener.seen)


def test_stop_process_group_signals_only_a_process_running_the_expected_command(decoy):
    from requant.processes import runs_command, stop_process_group

    stop_process_group(decoy.pid, grace_s=1, expect=("--port", "8000"))
    assert decoy.poll() is None and runs_command(decoy.pid, "sleep", "600")


# ---- Kubernetes: only objects requant created --------------------------------------------------


def test_a_deployment_of_another_owner_is_never_replaced(tmp_path):
    from kubernetes import client, config

    from requant.rollout.kubernetes import rollout_kubernetes
    from requant.rollout.state import Release
    from requant.settings import PipelineSettings
    from tests.fakek8s import FakeCluster

    with FakeCluster() as cluster:
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        apps = client.AppsV1Api(config.new_client_from_config(str(kubeconfig)))
        theirs = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "coredns", "namespace": "kube-system",
                               "labels": {"app.kubernetes.io/managed-by": "requant"}},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "dns"}},
                           "template": {"metadata": {"labels": {"k8s-app": "dns"}}, "spec": {
                               "containers": [{"name": "dns", "image": "coredns:1.11"}]}}}}
        apps.create_namespaced_deployment("kube-system", theirs)  # a label alone is no proof
        before = list(cluster.state.requests)
        settings = PipelineSettings.model_validate({"rollout": {
            "target": "kubernetes", "state_dir": str(tmp_path / "state"),
            "kubernetes": {"namespace": "kube-system", "deployment": "coredns",
                           "kubeconfig": str(kubeconfig), "poll_interval_s": 0.01}}})
        with pytest.raises(NotOurs, match=r"Deployment kube-system/coredns was not created by "
                           r"requant"):
            rollout_kubernetes(settings, Release("a" * 40, "org/m"), "run-1")
        writes = [(m, p) for m, p, _ in cluster.state.requests[len(before):]
                  if m in ("PUT", "PATCH", "DELETE", "POST")]
        assert writes == []
        image = cluster.state.deployments[("kube-system", "coredns")]["spec"]["template"][
            "spec"]["containers"][0]["image"]
        assert image == "coredns:1.11"


# ---- publish: nothing secret leaves -----------------------------------------------------------


def test_a_commit_holding_the_workers_token_is_refused_naming_the_file(tmp_path, monkeypatch):
    from requant.hub.secrets_check import refuse_secrets, worker_secrets

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    samples = tmp_path / "samples_gsm8k.jsonl"
    samples.write_text(json.dumps({"doc": {"question": f"HOME=/root\0HF_TOKEN={TOKEN}"}}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 100)
    secrets = worker_secrets(None)
    with pytest.raises(SecretInCommit) as err:
        refuse_secrets([("model.safetensors", weights), ("eval/baseline/samples.jsonl",
                                                          samples)], {}, secrets)
    assert err.value.file == "eval/baseline/samples.jsonl" and TOKEN not in str(err.value)
    url = tmp_path / "notes.md"
    url.write_text("mirror: https://admin:hunter2pw@internal.example/models")
    with pytest.raises(SecretInCommit, match="shaped like a credential"):
        refuse_secrets([("notes.md", url)], {}, secrets)
    refuse_secrets([("model.safetensors", weights)], {"README.md": "# a card"}, secrets)


def test_a_publish_of_eval_samples_holding_the_token_uploads_nothing(tmp_path, monkeypatch):
    """Through publish_checkpoint with the real huggingface_hub client against the test Hub."""
    from requant.hub.publish import publish_checkpoint
    from requant.settings import HubSettings
    from tests.fakehub import FakeHub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    evals = tmp_path / "eval" / "baseline"
    evals.mkdir(parents=True)
    (evals / "samples_gsm8k_local_1.jsonl").write_text(f'{{"arguments": "HF_TOKEN={TOKEN}"}}\n')
    manifest = {"source": {"model": "m", "revision": None},
                "recipe": {"scheme": "W8A8", "origin": "preset", "sha256": "0" * 64,
                           "text": ""},
                "inputs_fingerprint": "f", "versions": {}}
    with FakeHub(TOKEN, tmp_path / "hub") as hub:
        settings = HubSettings(repo_id="acme/model", endpoint=hub.endpoint)
        with pytest.raises(SecretInCommit, match=r"samples_gsm8k_local_1\.jsonl"):
            publish_checkpoint(settings, ckpt, tmp_path / "eval", None, manifest, None,
                               tmp_path / "publish", TOKEN)
        assert hub.state.calls == [] and hub.state.repos == {}  # nothing reached the Hub


# ---- the router: bounded bodies, hop-by-hop headers --------------------------------------------


def test_the_router_answers_413_past_its_body_limit_and_drops_connection_named_headers(
        tmp_path):
    from starlette.testclient import TestClient

    from requant.serving.router import create_app

    upstream = Listener()
    try:
        app = create_app(tmp_path / "router.json", "t0ken", max_body_bytes=1024)
        with TestClient(app, client=("127.0.0.1", 5000)) as client:
            client.put("/-/backend", json={"url": upstream.url, "revision": "r"},
                       headers={"Authorization": "Bearer t0ken"})
            big = client.post("/v1/completions", content=b"x" * 4096)
            assert big.status_code == 413 and "1024" in big.json()["error"]
            chunked = client.post("/v1/completions", content=iter([b"x" * 800] * 4))
            assert chunked.status_code == 413
            ok = client.post("/v1/completions", content=b"{}", headers={
                "Connection": "keep-alive, X-Internal-Auth", "X-Internal-Auth": "admin",
                "X-Kept": "1"})
            assert ok.status_code == 200
        forwarded = [r for r in upstream.seen if r["path"] == "/v1/completions"]
        assert len(forwarded) == 1  # the two over the limit never reached the backend
        assert "x-internal-auth" not in forwarded[0]["headers"]
        assert forwarded[0]["headers"]["x-kept"] == "1"
    finally:
        upstream.close()


# ---- smaller doors ----------------------------------------------------------------------------


def test_runs_prune_keep_0_deletes_only_folders_requant_made_for_runs(tmp_path):
    from requant.rundir import RunDir

    profile = operator_profile(tmp_path)
    RunDir.create(tmp_path / "runs", "run-1")
    (tmp_path / "runs" / "operators-notes").mkdir()
    (tmp_path / "runs" / "operators-notes" / "keep.txt").write_text("mine")
    proc = requant("runs", "prune", "--keep", "0", "--config", str(profile), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["operators-notes"]


def test_credentials_inside_a_url_are_refused_as_secrets(tmp_path):
    from requant.settings import load_settings

    with pytest.raises(SettingsError, match="looks like a secret"):
        load_settings(None, ["rollout.kubernetes.service_url=http://admin:pw1234@svc:8000"])


@pytest.mark.parametrize("name,text", [
    ("config.json", "{not json"),
    ("config.json", "[]"),
    ("tokenizer.json", '{"truncated": '),
])
def test_a_broken_model_folder_is_one_line_naming_source_model(tmp_path, name, text):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ROOT / "models/SmolLM2-135M-Instruct", model)
    (model / name).write_text(text)
    profile = operator_profile(tmp_path, source={"model": str(model)})
    proc = requant("run", "--config", str(profile), cwd=tmp_path)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "source.model" in proc.stderr and name in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_task_folder_reaching_outside_itself_is_refused_before_lm_eval_reads_it(tmp_path):
    from requant.evaluation.task_files import validate_tasks
    from requant.settings import EvaluationSettings

    tasks = hostile_task_folder(tmp_path)
    with pytest.raises(SettingsError, match=r"evaluation.task_dir: t.yaml reaches include"):
        validate_tasks(EvaluationSettings(task_dir=tasks, tasks=["gsm8k_local"]))
    (tasks / "t.yaml").write_text("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:"
                                  "\n    test: /proc/self/environ\n")
    with pytest.raises(SettingsError, match=r"reaches data_files /proc/(self|\d+)/environ"):
        validate_tasks(EvaluationSettings(task_dir=tasks, tasks=["x"]))
    assert not (tmp_path / "PWNED").exists()


def test_the_bundled_task_folder_passes_the_same_check():
    from requant.evaluation.task_files import check_task_files, task_roots
    from requant.settings import EvaluationSettings

    folder = ROOT / "deployments/lm_eval_tasks"
    check_task_files(folder, task_roots(EvaluationSettings(), folder))


def test_lm_eval_model_arguments_are_never_split_out_of_a_value():
    from requant.evaluation.lmeval import model_arg

    assert model_arg("pretrained", "/data/runs/1/checkpoint") == "/data/runs/1/checkpoint"
    for bad in ("/tmp/a,trust_remote_code=True", "--x", "a=b"):
        with pytest.raises(SettingsError, match="lm-eval's argument"):
            model_arg("pretrained", bad)


def test_served_names_and_sources_cannot_start_an_option():
    from requant.settings import load_settings

    for item in ("rollout.served_model_name=--trust-remote-code.x",
                 "source.model=--trust-remote-code", "source.revision=--x"):
        with pytest.raises(SettingsError):
            load_settings(None, [item])


def test_the_generated_docs_the_trust_table_and_the_module_map_are_what_the_code_renders():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from render_docs import rendered
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for path, text in rendered().items():
        assert path.read_text() == text, f"{path} is stale: run scripts/render_docs.py"
