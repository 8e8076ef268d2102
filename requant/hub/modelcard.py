"""The model card published with a checkpoint: a pure function of the run's records.

Built with huggingface_hub's ModelCard / ModelCardData so the metadata (base_model,
base_model_relation: quantized, eval results) is what the Hub indexes, and the body is what a
person reads: scores, recipe, calibration, versions, and how to serve it with vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from requant.evaluation.gate import recovery_span
from requant.quantization.recipes import modifiers
from requant.search import alternatives_text

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ scheme_title }} quantization of {{ base_line }}{{ base_revision_note }}: {{ scheme_text }},
in the compressed-tensors format, made by requant with llm-compressor {{ versions.llmcompressor }}
({{ algorithms }}). {{ ignored_text }}

## Evaluation

{{ eval_table }}

Gate: **{{ gate.status }}**{{ gate_note }}.

{{ alternatives }}
## Serve it with vLLM

```bash
vllm serve {{ repo_id }} --revision {{ tag }}
```

The revision pins this exact upload; `production` marks the revision currently in production.

## How it was made

Recipe ({{ recipe.origin }}, sha256 `{{ recipe.sha256[:16] }}`):

```yaml
{{ recipe.text }}```

Calibration: {{ calibration_line }}

| library | version |
| --- | --- |
{% for name, version in versions.items() %}| {{ name }} | {{ version }} |
{% endfor %}
`manifest.json` in this repository records the source files' hashes, the calibration
fingerprint, the hardware and timings; `eval/` holds lm-eval's results and the gate decision.
"""


def base_model_id(manifest: dict[str, Any]) -> str | None:
    """The Hub id of the source: the id itself, or what a local directory declared it came
    from (source.hub_id). A folder name is not a Hub id, and the Hub refuses it."""
    source = manifest["source"]
    if not source.get("local"):
        return source["model"]
    return (manifest.get("settings", {}).get("source") or {}).get("hub_id")


def render_card(
    *, repo_id: str, tag: str, manifest: dict[str, Any], gate: dict[str, Any] | None,
    baseline: dict[str, Any] | None, candidate: dict[str, Any] | None,
    quant_config: dict[str, Any] | None,
) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    source = manifest["source"]
    base_model = base_model_id(manifest)
    scheme = describe_scheme(quant_config or {})
    recipe = describe_recipe(manifest["recipe"].get("text") or "")
    eval_results = [
        EvalResult(task_type="text-generation", dataset_type=r["task"].removesuffix("_local"),
                   dataset_name=r["task"], metric_type=r["metric"].split(",")[0],
                   metric_value=round(r["candidate_score"], 4), metric_name=r["metric"])
        # model-index means "this model's score on the task": only a whole-set score is one.
        # After an early stop the card's table gives the subset's scores, labelled as such.
        for r in (gate or {}).get("rules", [])
        if r.get("candidate_score") is not None and r.get("questions") == r.get("total")
    ]
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized" if base_model else None,
        pipeline_tag="text-generation", library_name="transformers",
        tags=["requant", *scheme["tags"], *recipe["tags"], "compressed-tensors", "vllm"],
        model_name=repo_id.split("/")[-1], eval_results=eval_results or None,
    )
    calib = manifest.get("calibration") or {}
    stats = calib.get("stats") or {}
    settings_calib = manifest.get("settings", {}).get("calibration", {})
    calibration_line = (
        f"{stats.get('samples')} samples ({stats.get('total_tokens')} tokens, max "
        f"{stats.get('max_len')}) drawn with seed {settings_calib.get('seed')} from "
        f"`{settings_calib.get('dataset')}`, fingerprint `{(calib.get('fingerprint') or '')[:16]}`."
        if stats else "none (data-free recipe)."
    )
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{repo_id.split('/')[-1]}", repo_id=repo_id, tag=tag,
        base_line=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else
        f"a local model (`{Path(source['model']).name}`; it declared no Hub id in source.hub_id, "
        "so this card names no base_model)",
        scheme_title=scheme["title"], scheme_text=scheme["text"],
        algorithms=recipe["text"], ignored_text=ignored_text(quant_config or {}),
        base_revision_note=f" (revision `{source['revision'][:12]}`)" if source.get("revision")
        else "",
        eval_table=eval_table(gate, baseline, candidate), gate=gate or {"status": "not run"},
        gate_note=gate_note(gate), alternatives=alternatives_text((gate or {}).get("search")),
        recipe=manifest["recipe"], calibration_line=calibration_line,
        versions={k: v for k, v in manifest["versions"].items() if v},
    )
    return str(card)


def eval_table(gate: dict[str, Any] | None, baseline: dict[str, Any] | None,
               candidate: dict[str, Any] | None) -> str:
    """Every gate rule's numbers on the questions the candidate answered (never a subset's
    score passed off as the whole set's), the recovery interval and the bar it had to clear."""
    if not (gate and gate.get("rules")):
        return "Not evaluated."
    rows = []
    for r in gate["rules"]:
        rec = f"{r['recovery']:.2%}" if r.get("recovery") is not None else "n/a"
        cand = f"{r['candidate_score']:.4f}" if r.get("candidate_score") is not None else "n/a"
        base = f"{r['baseline_score']:.4f}" if r.get("baseline_score") is not None else "n/a"
        subset = "" if r["questions"] == r["total"] else " (a subset: the gate stopped early)"
        rows.append(f"| {r['task']} | {r['metric']} | {r['questions']} of {r['total']}{subset} "
                    f"| {base} | {cand} | {rec} | {recovery_span(r.get('interval') or {})} | "
                    f"{r['min_recovery']} | {r['status']} |")
    return "\n".join([
        "| task | metric | questions | baseline | this model | recovery | recovery interval | "
        "min_recovery | rule |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        "lm-eval against the model served by vLLM; both scores are on the same questions (the "
        "gate's seeded order; after an early stop, the questions answered so far, not the whole "
        "set). A rule passes when the recovery interval (this model / baseline, a repeated "
        "interval valid at every look) lies above min_recovery.",
    ])


def gate_note(gate: dict[str, Any] | None) -> str:
    if not gate or not gate.get("rules"):
        return ""
    early = ", stopped early" if gate.get("stopped_early") else ""
    return (f" (look {gate['look']} of {gate['looks']}, {gate['questions']} of {gate['total']} "
            f"questions{early}; one-sided {gate['thresholds']['confidence']:.0%} per rule)")


def describe_scheme(quant_config: dict[str, Any]) -> dict[str, Any]:
    """Title, sentence and tags from the checkpoint's own quantization_config: what was applied,
    whatever the recipe's name said."""
    groups = list((quant_config.get("config_groups") or {}).values())
    if not groups:
        return {"title": "Custom", "text": "see the recipe below", "tags": []}
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    w_kind = _kind(weights)
    a_kind = _kind(acts) if acts else None
    granularity = {"channel": "per-channel", "group": f"group size {weights.get('group_size')}",
                   "tensor": "per-tensor", "block": "per-block"}.get(weights.get("strategy"), "")
    text = f"{w_kind} weights ({granularity})" if granularity else f"{w_kind} weights"
    if a_kind:
        dyn = "dynamic " if acts.get("dynamic") else "static "
        per = {"token": "per-token ", "tensor": "per-tensor "}.get(acts.get("strategy"), "")
        text += f" and {dyn}{per}{a_kind} activations"
    else:
        text += " and 16-bit activations"
    short = f"W{weights.get('num_bits')}A{acts.get('num_bits') if acts else 16}"
    tags = sorted({short.lower(), w_kind.lower(), *([a_kind.lower()] if a_kind else [])})
    return {"title": short, "text": text, "tags": tags}


def _kind(args: dict[str, Any]) -> str:
    return f"{'FP' if args.get('type') == 'float' else 'INT'}{args.get('num_bits')}"


def describe_recipe(recipe_text: str) -> dict[str, Any]:
    """Which algorithms ran, from the recipe that was applied (SmoothQuant or not)."""
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        recipe = {}
    found = {name: args if isinstance(args, dict) else {} for name, args in modifiers(recipe)}
    parts, tags = [], []
    if "SmoothQuantModifier" in found:
        parts.append("SmoothQuant, smoothing strength "
                     f"{found['SmoothQuantModifier'].get('smoothing_strength', 0.5)}")
        tags.append("smoothquant")
    if "GPTQModifier" in found:
        parts.append("GPTQ")
        tags.append("gptq")
    parts += [name.removesuffix("Modifier") for name in found
              if name not in ("SmoothQuantModifier", "GPTQModifier")]
    return {"text": " + ".join(parts) or "recipe below", "tags": tags}


def ignored_text(quant_config: dict[str, Any]) -> str:
    ignored = list(quant_config.get("ignore") or [])
    if not ignored:
        return "Every Linear layer is quantized."
    shown = ", ".join(f"`{name}`" for name in ignored[:8])
    more = f" and {len(ignored) - 8} more" if len(ignored) > 8 else ""
    return f"Left unquantized: {shown}{more}."
