"""Work-pool base job templates that a custom run cannot widen (docs/trust.md).

Prefect lets whoever starts a run override the pool's *job variables*: with the default process
template that is the ``command`` the worker executes, the ``env`` of the flow's process and its
``working_dir``; with Docker or Kubernetes also the image, volumes, service account and
namespace. Each is a way to run code with the worker's rights. ``lock`` bakes every variable's
operator value (its default in the template) into the job configuration and leaves a variables
schema that admits only names and labels, with ``additionalProperties: false``: the Prefect
server then refuses a run that overrides anything else (HTTP 422) before it exists.
``scripts/prefect_apply.sh`` creates every pool from a locked template.

    python -m requant.job_template TEMPLATE.json > LOCKED.json
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

#: Job variables a run may still set: they only name and label what the worker creates.
RUN_MAY_SET = ("name", "labels")
#: Environment every flow-run process gets from the pool, whatever the deployment or the run.
POOL_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # a heartbeat every 30 s: the automation "requant: mark silent runs Crashed"
    # (requant/alerts.py) marks a run Crashed 75 s after its last one
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
}
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def lock(template: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``template`` with every job variable but ``RUN_MAY_SET`` fixed to its default."""
    props = template.get("variables", {}).get("properties", {})
    defaults = {name: spec.get("default") for name, spec in props.items()
                if name not in RUN_MAY_SET}
    config = _bake(template["job_configuration"], defaults)
    config["env"] = {**(config.get("env") or {}), **POOL_ENV, **(env or {})}
    return {"job_configuration": config,
            "variables": {"type": "object", "additionalProperties": False,
                          "properties": {k: props[k] for k in RUN_MAY_SET if k in props}}}


def open_variables(template: dict[str, Any]) -> list[str]:
    """Placeholders left in the job configuration that a run could fill (all but names and
    labels): empty for a locked template."""
    found = set(_PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    return sorted(found - set(RUN_MAY_SET))


def _bake(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _bake(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_bake(v, values) for v in node]
    if not isinstance(node, str):
        return node
    whole = _PLACEHOLDER.fullmatch(node.strip())
    if whole and whole.group(1) in values:
        return values[whole.group(1)]
    return _PLACEHOLDER.sub(
        lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), node)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(lock(json.load(f)), indent=2))
