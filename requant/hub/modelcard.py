"""The model card published with a checkpoint: a pure function of the run's records.

Built with huggingface_hub's ModelCard / ModelCardData so the metadata (base_model,
base_model_relation: quantized, eval results) is what the Hub indexes, and the body is what a
person reads: scores, recipe, calibration, versions, and how to serve it with vLLM.
"""

from __future__ import annotations

from typing import Any

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

W8A8 quantization of [{{ base_model }}]({{ base_link }}){{ base_revision_note }}: INT8 weights
(per-channel) and dynamic per-token INT8 activations, in the compressed-tensors format, made by
requant with llm-compressor {{ versions.llmcompressor }}. `lm_head` is left unquantized.

## Evaluation

{{ eval_table }}

Gate: **{{ gate.status }}**{{ gate_note }}.

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


def render_card(
    *, repo_id: str, tag: str, manifest: dict[str, Any], gate: dict[str, Any] | None,
    baseline: dict[str, Any] | None, candidate: dict[str, Any] | None,
) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    source = manifest["source"]
    base_model = source["model"] if not source.get("local") else source["model"].rstrip("/") \
        .split("/")[-1]
    eval_results = [
        EvalResult(task_type="text-generation", dataset_type=r["task"].removesuffix("_local"),
                   dataset_name=r["task"], metric_type=r["metric"].split(",")[0],
                   metric_value=round(r["candidate_score"], 4), metric_name=r["metric"])
        for r in (gate or {}).get("rules", []) if r.get("candidate_score") is not None
    ]
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized", pipeline_tag="text-generation",
        library_name="transformers", tags=["requant", "w8a8", "int8", "compressed-tensors", "vllm"],
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
        base_model=base_model,
        base_link=f"https://huggingface.co/{base_model}" if not source.get("local") else "#",
        base_revision_note=f" (revision `{source['revision'][:12]}`)" if source.get("revision")
        else "",
        eval_table=eval_table(gate, baseline, candidate), gate=gate or {"status": "not run"},
        gate_note=gate_note(gate), recipe=manifest["recipe"], calibration_line=calibration_line,
        versions={k: v for k, v in manifest["versions"].items() if v},
    )
    return str(card)


def eval_table(gate: dict[str, Any] | None, baseline: dict[str, Any] | None,
               candidate: dict[str, Any] | None) -> str:
    """Every gate rule's numbers: the scores on the questions the candidate answered, the
    paired interval and the tolerance it had to clear."""
    if not (gate and gate.get("rules")):
        return "Not evaluated."
    rows = []
    for r in gate["rules"]:
        iv = r.get("interval") or {}
        rec = f"{r['recovery']:.2%}" if r.get("recovery") is not None else "n/a"
        cand = f"{r['candidate_score']:.4f}" if r.get("candidate_score") is not None else "n/a"
        base = (f"{r['baseline_on_evaluated']:.4f}" if r.get("baseline_on_evaluated")
                is not None else f"{r['baseline_score']:.4f}")
        span = f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" if iv else "n/a"
        rows.append(f"| {r['task']} | {r['metric']} | {base} | {cand} | {rec} | {span} | "
                    f"{-r['delta']:+.4f} | {r['status']} | {r['questions']} of {r['total']} |")
    return "\n".join([
        "| task | metric | baseline | this model | recovery | paired interval | -δ | rule | "
        "questions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        "lm-eval against the model served by vLLM; baseline and this model answered the same "
        "questions. A rule passes when the paired interval (this model - baseline) lies above "
        "-δ.",
    ])


def gate_note(gate: dict[str, Any] | None) -> str:
    if not gate or not gate.get("rules"):
        return ""
    early = ", stopped early" if gate.get("stopped_early") else ""
    return (f" (look {gate['look']} of {gate['looks']}, {gate['questions']} of {gate['total']} "
            f"questions{early}; one-sided {gate['thresholds']['confidence']:.0%} per rule)")
