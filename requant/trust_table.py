"""docs/trust.md's table of who chooses what, rendered from the models themselves
(``scripts/render_docs.py`` writes it; ``tests/test_docs_generated.py`` fails when it is stale)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from requant.run_request import RunRequest, operator_fields

BEGIN, END = "<!-- trust-table:begin (generated: scripts/render_docs.py) -->", \
    "<!-- trust-table:end -->"


def render() -> str:
    rows = ["| run request field (`--set`, the UI form) | bound in the form | what the "
            "profile adds |", "| --- | --- | --- |"]
    schema = RunRequest.model_json_schema()
    for path, node in _leaves(schema, schema):
        rows.append(f"| `{path}` | {_bound(node)} | {_note(node)} |")
    groups: dict[str, list[str]] = defaultdict(list)
    for field in operator_fields():
        section, _, rest = field.partition(".")
        groups[section if rest else "(top level)"].append(rest or section)
    rows += ["", "Everything else is the worker operator's profile "
             f"({len(operator_fields())} fields); a run naming one is refused with exit 2:", "",
             "| profile section | fields a run cannot choose |", "| --- | --- |"]
    rows += [f"| `{s}` | {', '.join(f'`{f}`' for f in fields)} |"
             for s, fields in sorted(groups.items())]
    return "\n".join([BEGIN, *rows, END])


def _leaves(schema: dict[str, Any], node: dict[str, Any], path: str = ""):
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if node.get("type") == "object" and "properties" in node:
        for name, sub in node["properties"].items():
            yield from _leaves(schema, sub, f"{path}.{name}".lstrip("."))
        return
    yield path, node


def _bound(node: dict[str, Any]) -> str:
    parts = []
    for o in node.get("anyOf", [node]):
        if o.get("type") == "null":
            continue
        if "enum" in o:
            parts.append(" / ".join(f"`{v}`" for v in o["enum"]))
        elif o.get("type") == "boolean":
            parts.append("true / false")
        elif "pattern" in o:
            parts.append(f"`{o['pattern']}`".replace("|", "\\|"))
        elif o.get("type") in ("integer", "number"):
            low = o.get("minimum", o.get("exclusiveMinimum"))
            high = o.get("maximum", o.get("exclusiveMaximum"))
            parts.append(f"{o['type']} {low} .. {high}")
        elif o.get("type") == "array":
            parts.append(f"up to {o.get('maxItems')} names")
        else:
            parts.append(o.get("type", "?"))
    return " or ".join(parts) + (" (unset: the profile's)" if "anyOf" in node else "")


def _note(node: dict[str, Any]) -> str:
    return (node.get("description") or "").replace("|", "\\|").replace("\n", " ")
