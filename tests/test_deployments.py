"""prefect.yaml and the work-pool templates, checked without a server: the parameters are valid
settings, the nightly runs the production config, the automation listens for the right event,
and the Kubernetes job templates render to manifests that pass schema validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.utilities.templating import apply_values

from requant.profile import load_named
from requant.rollout.k8s_manifest import validate
from requant.run_request import validate_request
from requant.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PROJECT["deployments"]}


def profile_of(deployment: str):
    """The worker's profile a deployment's run request names (the bundled one here)."""
    request = validate_request(DEPLOYMENTS[deployment]["parameters"]["request"])
    return load_named(request.profile, ROOT / "deployments" / "configs")


def test_project_declares_nightly_on_demand_and_promote_deployments_on_two_pools():
    assert set(DEPLOYMENTS) == {"requantize-nightly", "requantize", "promote"}
    assert DEPLOYMENTS["requantize-nightly"]["work_pool"]["name"] == "requant-gpu"
    assert DEPLOYMENTS["requantize"]["work_pool"]["name"] == "requant-gpu"
    assert DEPLOYMENTS["promote"]["work_pool"]["name"] == "requant-serving"
    for d in DEPLOYMENTS.values():
        module, func = d["entrypoint"].split(":")
        assert func in (ROOT / module).read_text()


def test_nightly_is_scheduled_at_two_with_an_explicit_timezone():
    (schedule,) = DEPLOYMENTS["requantize-nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "Europe/Berlin"


def test_nightly_runs_the_production_profile_and_names_nothing_else():
    assert DEPLOYMENTS["requantize-nightly"]["parameters"] == {
        "request": {"profile": "production-llama3-8b"}}
    nightly = profile_of("requantize-nightly").settings
    production = load_settings(ROOT / "deployments/configs/production-llama3-8b.yaml")
    assert nightly == production
    assert nightly.rollout.trigger == "automation" and nightly.hub.token_secret == "hf-token"


def test_on_demand_profile_is_the_demo_that_leaves_promotion_to_the_automation():
    assert DEPLOYMENTS["requantize"]["parameters"] == {"request": {"profile": "on-demand"}}
    settings = profile_of("requantize").settings
    assert settings.rollout.target == "local" and settings.rollout.trigger == "automation"


def test_promote_automation_fires_on_gate_passed_from_runs_that_delegate_promotion():
    (trigger,) = DEPLOYMENTS["promote"]["triggers"]
    assert trigger["expect"] == ["requant.gate.passed"]
    assert trigger["match"] == {"prefect.resource.id": "requant.model.*",
                                "requant.promote": "automation"}
    assert set(trigger["parameters"]) == {"request", "revision", "checkpoint"}
    assert "requant.gate.failed" not in json.dumps(PROJECT)  # a failed gate starts nothing


@pytest.mark.parametrize("pool", ["gpu", "serving"])
def test_kubernetes_work_pool_job_template_renders_to_a_valid_job(pool):
    template = json.loads((ROOT / f"deployments/work-pools/kubernetes-{pool}.json").read_text())
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values |= {"name": "requant-run", "command": "prefect flow-run execute",
               "labels": {"prefect.io/flow-run-id": "x"}}
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = container["args"].split()  # what the worker does with both
    validate(job)
    resources = container["resources"]
    if pool == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
    else:
        assert "limits" not in resources
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert claim["claimName"] == "hf-model-cache"


@pytest.mark.parametrize("pool", ["gpu", "serving"])
def test_docker_work_pool_template_fills_every_placeholder_from_its_variables(pool):
    template = json.loads((ROOT / f"deployments/work-pools/docker-{pool}.json").read_text())
    props = template["variables"]["properties"]
    for key, value in template["job_configuration"].items():
        assert value == "{{ " + key + " }}" and key in props
    assert props["env"]["default"]["REQUANT_PROJECT_DIR"] == "/opt/requant"
    assert any(v.endswith(":/data") for v in props["volumes"]["default"])


def test_gpu_pool_jobs_request_as_many_gpus_as_each_deployment_quantizes_with():
    """A deployment with quantization.gpus=N must get N GPUs from every GPU pool flavour; the
    Docker request is also built by docker-py itself, which rejects unknown fields."""
    from docker.types import HostConfig

    k8s = json.loads((ROOT / "deployments/work-pools/kubernetes-gpu.json").read_text())
    docker = json.loads((ROOT / "deployments/work-pools/docker-gpu.json").read_text())
    k8s_default = k8s["variables"]["properties"]["gpu_count"]["default"]
    docker_default = docker["variables"]["properties"]["container_create_kwargs"]["default"]
    HostConfig(version="1.44", **docker_default)  # raises on a malformed device request
    for d in DEPLOYMENTS.values():
        if d["work_pool"]["name"] != "requant-gpu":
            continue
        gpus = profile_of(d["name"]).settings.quantization.gpus
        assert "job_variables" not in d["work_pool"], d["name"]  # the templates are locked
        assert k8s_default >= gpus, d["name"]
        assert sum(r["count"] for r in docker_default["device_requests"]) >= gpus, d["name"]


def test_production_kubernetes_strategy_never_drops_serving_capacity():
    from requant.rollout.k8s_manifest import check_strategy

    for settings in (load_settings(ROOT / "deployments/configs/production-llama3-8b.yaml"),
                     profile_of("requantize-nightly").settings):
        k = settings.rollout.kubernetes
        assert str(k.max_unavailable) in {"0", "0%"} and not k.allow_downtime
        check_strategy(k)


@pytest.mark.parametrize("published", [True, False], ids=["commit", "dry-run-checkpoint"])
def test_the_promote_trigger_renders_the_gate_event_into_parameters_the_promote_flow_accepts(
        published):
    """The automation creates the promote run only if the rendered parameters pass the promote
    deployment's parameter schema (the server validates them); a payload's "" is unset."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from requant.flows.promote import promote
    from requant.flows.requantize import gate_payload
    from requant.run_request import RunRequest
    from requant.settings import PipelineSettings

    summary = {"run_id": "r1", "source": {"model": "models/x"}, "search": None,
               "gate": {"status": "pass", "rules": [{"recovery": 0.99}]},
               "checkpoint": "/data/requant/runs/r1/checkpoint",
               "publish": {"dry_run": not published, "tag": "t",
                           "commit_sha": "a" * 40 if published else None}}
    request = RunRequest(profile="on-demand")
    payload = gate_payload(PipelineSettings(), request, summary, passed=True)
    (trigger,) = DEPLOYMENTS["promote"]["triggers"]
    # what the server's run-deployment action does with each "{{ event.payload.X }}": its value
    # through tojson, so a dict stays a dict and a string a string
    rendered = {}
    for name, template in trigger["parameters"].items():
        key = template.strip().removeprefix("{{").removesuffix("}}").strip()
        assert key.startswith("event.payload.")
        rendered[name] = json.loads(json.dumps(payload[key.removeprefix("event.payload.")]))
    schema = parameter_schema(promote).model_dump_for_openapi()
    assert validate(rendered, schema, raise_on_error=False) == []
    assert rendered["request"] == request.model_dump(mode="json")
    assert bool(rendered["revision"]) == published and bool(rendered["checkpoint"]) != published
