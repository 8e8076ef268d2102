"""The pipeline's one settings model.

It is at once the flow's parameters (Prefect renders it as the run form in the UI), the schema of
the YAML files under ``deployments/``, and the manifest's record of what was asked. Every default
lives here and nowhere else; the embedded default (``PipelineSettings()``) is the offline demo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from requant.errors import SettingsError
from requant.schemes import PRESETS

QuantPreset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the preset table's names

#: The checkout requant runs from (an editable install, as ``make envs`` makes it). Relative
#: paths in settings resolve against the working directory; only tool defaults (the serving
#: environment, the bundled lm-eval tasks) use this.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Where ``scripts/prepare_demo_model.py`` builds the demo model (relative to the project root).
DEMO_MODEL_DIR = "models/SmolLM2-135M-Instruct"
#: Chat-format calibration rows made from GSM8K train (MIT), shipped with the project.
DEMO_CALIBRATION_FILE = "data/calibration/gsm8k-chat-1k.jsonl"


class _Section(BaseModel):
    # Unknown keys are almost always typos ("num_sample"); silently ignoring them would run a
    # different job than the one asked for.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSettings(_Section):
    """The model to quantize."""

    model: str = Field(
        DEMO_MODEL_DIR,
        description="Hugging Face Hub model id (owner/name) or a local directory with config.json.",
        min_length=1, pattern=r"^[^\s,=-][^\n,=]*$",
    )
    revision: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$",
        description="Hub branch, tag or commit. The manifest records the commit it resolved to.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the repo.")
    hub_id: str | None = Field(
        None,
        description="For a local directory: the Hub model id it was downloaded from, so the "
        "published card can name its base_model (the Hub accepts only Hub ids there). None: the "
        "card leaves base_model out and says why. A Hub id in `model` is used as is.",
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
    )


class CalibrationSettings(_Section):
    """The calibration set SmoothQuant and GPTQ collect their statistics on."""

    dataset: str = Field(
        DEMO_CALIBRATION_FILE,
        description="Hub dataset id, or a local .json/.jsonl/.parquet file.",
        min_length=1,
    )
    subset: str | None = Field(None, description="Hub dataset config name, if it has several.")
    split: str = Field("train", description="Split to draw samples from (Hub datasets).")
    messages_column: str = Field(
        "messages",
        description="Column of chat rows ([{role, content}, ...]); rendered with the model's "
        "own chat template. Used when the dataset has it.",
    )
    text_column: str = Field(
        "text", description="Column of plain text, used when the dataset has no messages column."
    )
    num_samples: int = Field(64, gt=0, description="Samples drawn after a seeded shuffle.")
    max_seq_len: int = Field(512, gt=0, description="Samples are truncated to this many tokens.")
    seed: int = Field(42, description="Shuffle seed: the same seed draws the same samples.")
    pad_to_max_length: bool = Field(
        False,
        description="Pad every sample to max_seq_len, as the seed tutorial did. Off by default: "
        "padding only adds compute (see docs/calibration.md). Kept for benchmarks.",
    )


class QuantizationSettings(_Section):
    """How llm-compressor's oneshot quantizes the model."""

    preset: QuantPreset = Field(
        "w8a8-int8",
        description=". ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + ".",
    )
    recipe: Path | None = Field(
        None,
        description="An llm-compressor recipe YAML file; when set it replaces the preset.",
    )
    smoothing_strength: float = Field(
        0.8, gt=0.0, lt=1.0, description="SmoothQuant migration strength (alpha)."
    )
    dampening_frac: float = Field(
        0.01, gt=0.0, lt=1.0, description="GPTQ Hessian dampening, as a fraction of its mean."
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules left unquantized (names or 're:' regexes).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: a GPU when one is present, else the CPU."
    )
    gpus: int = Field(
        1, ge=1, le=64,
        description="GPUs one quantization uses. Above 1, calibration runs data-parallel under "
        "torchrun (one process per GPU, samples split in contiguous shards, each layer's "
        "statistics merged, GPTQ's solves split across ranks); the checkpoint equals one GPU's "
        "up to float summation order, and repeats bit for bit. Worth it for large models only: "
        "2 H200s quantize an 8B model 1.18x faster than one (docs/quantization.md). With "
        "device=cpu, that many CPU processes on gloo: for tests, not speed.",
    )
    allow_tf32: bool = Field(
        True,
        description="TF32 matmuls during calibration on NVIDIA GPUs (measured 1.33x faster on "
        "an H100; the quantized weights are still computed in fp32 by GPTQ).",
    )
    pipeline: Literal["single-pass", "llm-compressor"] = Field(
        "single-pass",
        description="single-pass: SmoothQuant and GPTQ calibrate in one pass over the data, one "
        "Hessian per shared Linear input (docs/quantization.md; 3.5x faster at 512 samples on an "
        "H100), on one GPU or several. Recipes it does not cover use llm-compressor's own "
        "pipeline (one pass per modifier). llm-compressor: always its pipeline.",
    )
    activation_cache: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="Where layer-to-layer activations wait during calibration. auto: on the GPU "
        "when they take at most half its free memory (saves host<->GPU copies), else host RAM.",
    )
    resume: bool = Field(
        True,
        description="single-pass: keep each finished decoder layer under "
        "cache_dir/quantization-resume/<key of the inputs> as it completes, so a run killed "
        "midway continues at the first unfinished layer, with the same checkpoint to the bit. "
        "Costs disk up to one copy of the model; deleted once the checkpoint is verified. "
        "With quantization.gpus > 1, rank 0 keeps the layers and a rerun on as many ranks "
        "resumes.",
    )
    resume_inputs_every: int = Field(
        0, ge=0,
        description="single-pass, one process: every this many layers (8 is a good value), "
        "also keep the hidden states entering the next layer (written in the background; one "
        "copy on disk and one in host memory while it is written: the activations' size, "
        "8.6 GB at 512 x 2048 x 4096 in bf16), so a resumed run starts from them instead of "
        "running every stored layer again. Measured on an H200 at 8B: an uninterrupted run "
        "10 % slower, a resumed one 63 % of a plain run instead of 76 %. For jobs likely to "
        "be cut short (preemptible nodes, 70B). 0: never.",
    )
    verify_reload: bool = Field(
        True, description="After saving, reload the checkpoint and run a forward pass."
    )
    gpu_memory_wait_s: float = Field(
        900, ge=0,
        description="How long quantization waits for the GPU memory it needs (another run, or "
        "the local serving vLLM, may hold it) before failing with who holds it.",
    )
    smoothing_tolerance: float | None = Field(
        None, gt=0.0,
        description="Largest relative change SmoothQuant may cause in any decoder layer's "
        "update (output - input, on the inputs it saw before) or in a first-layer Linear's "
        "output before the run stops as 'not exact'. None: from the model's dtype (bf16: "
        "0.0625 and 0.031); a wrong mapping changes them by ~1.",
    )


class ServerSettings(_Section):
    """The vLLM OpenAI-compatible server that evaluation talks to (the seed's serve knobs). Which
    Python runs it is the worker's choice, never a run's: $REQUANT_SERVING_PYTHON, else
    .venvs/serving/bin/python (docs/trust.md)."""

    host: str = "127.0.0.1"
    port: int | None = Field(None, gt=0, lt=65536, description="None: a free port.")
    max_model_len: int = Field(4096, gt=0, description="Context length the server allows.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="GPU hosts only.")
    max_num_seqs: int = Field(64, gt=0, description="Sequences batched at once.")
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enforce_eager: bool | None = Field(
        None,
        description="Skip torch.compile / CUDA graphs. None: eager on CPU (compiling costs more "
        "start-up than a gate evaluation saves), compiled on GPU.",
    )
    extra_args: list[str] = Field(default_factory=list, description="Appended to the command.")
    env: dict[str, str] = Field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "4",
                                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        description="Extra environment for the server. CPU hosts: VLLM_CPU_KVCACHE_SPACE is GiB "
        "of KV cache; VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets the engine compute on every core "
        "instead of keeping one for the HTTP frontend (1.7x the prefill throughput on 2 cores: "
        "docs/evaluation.md).",
    )
    startup_timeout_s: float = Field(900, gt=0, description="Deadline for /health + /v1/models.")
    stop_grace_s: float = Field(30, ge=0, description="SIGTERM, then SIGKILL after this long.")


class EvaluationSettings(_Section):
    """lm-eval against the served model: the numbers the gate decides on."""

    enabled: bool = Field(True, description="Evaluate and gate; off: stop after quantization.")
    backend: Literal["server", "vllm"] = Field(
        "server",
        description="server: a vLLM server process + lm-eval's local-completions over HTTP. "
        "vllm: lm-eval's in-process vllm backend, run inside the serving environment.",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["gsm8k_local", "gsm8k_cloze_local"], min_length=1,
        description="lm-eval task names. gsm8k_local is gsm8k from the bundled files, "
        "gsm8k_cloze_local the demo's cloze task (deployments/lm_eval_tasks); production uses "
        "gsm8k from the Hub.",
    )
    task_dir: Path | None = Field(
        Path("deployments/lm_eval_tasks"),
        description="Extra lm-eval task YAMLs (include_path); data_files are relative to it.",
    )
    data_roots: list[Path] = Field(
        default_factory=lambda: [Path("data")], description="Folders beside task_dir where a "
        "task YAML may read files (include, !function, data_files); anything else is refused "
        "before lm-eval reads it. The default is the project's data/ (the bundled GSM8K), "
        "relative like task_dir.")
    num_fewshot: int = Field(5, ge=0, description="Few-shot examples per question.")
    task_fewshot: dict[str, int] = Field(
        default_factory=lambda: {"gsm8k_cloze_local": 0},
        description="Per-task override of num_fewshot, e.g. {gsm8k_cloze_local: 0}.",
    )
    limit: int | None = Field(
        None, gt=0, description="Evaluate only the first N documents per task (None: all)."
    )
    task_limits: dict[str, int | None] = Field(
        default_factory=lambda: {"gsm8k_local": 8, "gsm8k_cloze_local": 652},
        description="Per-task override of limit, e.g. {gsm8k_local: 100} (null: all). The "
        "demo's: 8 gsm8k questions (evaluated, not gated), 652 of the cloze task's 1302.",
    )
    num_concurrent: int = Field(8, gt=0, description="Concurrent requests to the server.")
    max_gen_toks: int = Field(256, gt=0, description="Generation budget per answer.")
    add_bos_token: bool = Field(True, description="Prefix prompts with BOS, as the seed did.")
    server: ServerSettings = Field(
        default_factory=lambda: ServerSettings(gpu_memory_utilization=0.5),
        description="The vLLM server evaluation starts (baseline, then candidate). On a GPU "
        "host it shares the GPU with the local serving vLLM: 0.5 by default.",
    )


class GateRule(_Section):
    """One thing the candidate must show: no real loss on this task's metric."""

    task: str = Field(min_length=1, description="An lm-eval task from evaluation.tasks.")
    metric: str = Field(
        "exact_match,strict-match",
        description="lm-eval 'metric,filter' as in its results, e.g. exact_match,flexible-extract "
        "or acc,none.",
    )
    min_recovery: float = Field(
        0.957, gt=0.0, le=1.0,
        description="The candidate must recover at least this share of the baseline's score on "
        "the same questions (a ratio-form non-inferiority test). The default is the tightest "
        "that holds the gate's error rates on gsm8k (docs/evaluation.md).",
    )
    min_candidate_score: float | None = Field(
        None, ge=0.0, le=1.0, description="Optional absolute floor on the candidate's score."
    )
    min_baseline: float = Field(
        0.10, ge=0.0, le=1.0,
        description="A source scoring below this cannot show a loss on the task: the run ends "
        "before quantization. 0 disables the check.",
    )

    @field_validator("metric")
    @classmethod
    def _metric_with_filter(cls, value: str) -> str:
        if value.count(",") != 1:
            raise ValueError("must be 'metric,filter', e.g. 'exact_match,strict-match'")
        return value


def _default_rules() -> list[GateRule]:
    """The demo's rule (the embedded default is the demo): a task SmolLM2-135M can do. The
    production rules, gsm8k strict-match and flexible-extract, are in its config."""
    return [GateRule(task="gsm8k_cloze_local", metric="acc,none", min_baseline=0.40)]


class GateSettings(_Section):
    """When a candidate may leave the machine: every rule must pass (docs/evaluation.md)."""

    rules: list[GateRule] = Field(
        default_factory=_default_rules, min_length=1,
        description="All must pass. Production: gsm8k 5-shot strict-match and "
        "flexible-extract (deployments/configs/production-llama3-8b.yaml).",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0,
        description="One-sided level of each decision: a candidate recovering exactly "
        "min_recovery passes a rule with probability at most 1 - confidence, whatever the "
        "number of looks.",
    )
    looks: list[float] = Field(
        default_factory=lambda: [0.5, 1.0], min_length=1,
        description="Fractions of the questions after which the candidate's evaluation may stop "
        "early (the last must be 1.0). [1.0]: one look, no early stop. Each look costs a "
        "server start on each side when undecided; two looks suit a few hundred questions "
        "(the demo), four a full gsm8k (the production file).",
    )
    order_seed: int = Field(
        1234, description="Seed of the fixed question order the stages follow."
    )
    allow_inconclusive: bool = Field(
        False, description="Let an inconclusive result promote. Never overrides a failure."
    )

    @field_validator("looks")
    @classmethod
    def _looks_increase_to_one(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < x <= 1.0 for x in value) or value != sorted(set(value)) \
                or value[-1] != 1.0:
            raise ValueError("must be increasing fractions in (0, 1] ending with 1.0, e.g. "
                             "[0.25, 0.5, 0.75, 1.0]")
        return value


class Candidate(_Section):
    """One way of quantizing, tried against the same baseline in one run. A field left unset
    keeps ``quantization``'s value, so a candidate names only what it changes."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,39}$",
        description="Short, unique: lowercase letters, digits and '-' (it names the "
        "candidate's folder, its row in the table and, if it wins, the model card's choice).",
    )
    preset: QuantPreset | None = Field(None, description="Replaces quantization.preset.")
    recipe: Path | None = Field(None, description="Replaces quantization.recipe.")
    smoothing_strength: float | None = Field(
        None, gt=0.0, lt=1.0, description="Replaces quantization.smoothing_strength.")
    dampening_frac: float | None = Field(
        None, gt=0.0, lt=1.0, description="Replaces quantization.dampening_frac.")
    ignore: list[str] | None = Field(None, description="Replaces quantization.ignore.")

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name"}, exclude_none=True)


class LoadSettings(_Section):
    """The seed's load test: the same fixed load wherever serving is measured, so figures
    compare (a deployment before traffic moves to it, search candidates by throughput)."""

    requests: int = Field(64, gt=0, description="Chat completions sent.")
    concurrency: int = Field(64, gt=0, description="In flight at once.")
    max_tokens: int = Field(64, gt=0, description="Tokens generated per request.")
    timeout_s: float = Field(300, gt=0, description="Per-request timeout of the load test.")


class SearchSettings(_Section):
    """Several candidates in one run; the best one that passes the gate is published.

    Each candidate is gated at the gate's level divided by the number of candidates
    (Bonferroni), so the run as a whole promotes a candidate worse than the tolerance with at
    most the gate's stated probability, however many are tried (docs/evaluation.md)."""

    candidates: list[Candidate] = Field(
        default_factory=list, max_length=8,
        description="Empty: one candidate, quantization's settings (today's run). Otherwise "
        "each is quantized, verified and gated against one baseline evaluation; one that fails "
        "is recorded with why and does not stop the others.",
    )
    objective: Literal["order", "smallest", "accuracy", "throughput"] = Field(
        "order",
        description="Which passing candidate wins. order: the first in the list (the search "
        "stops at the first pass). smallest: the smallest checkpoint (all are quantized, then "
        "gated smallest first, stopping at the first pass). accuracy: the highest recovery "
        "(its worst rule's point estimate; every candidate is gated). throughput: the most "
        "generated tokens/s under search.load (every candidate is gated; each that passes is "
        "served with evaluation.server's settings and measured). Ties: list order.",
    )
    load: LoadSettings = Field(
        default_factory=LoadSettings,
        description="The load each passing candidate is measured under when the objective is "
        "throughput: the same for all, so the figures compare. A candidate with a failed "
        "request cannot win.",
    )

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, value: list[Candidate]) -> list[Candidate]:
        names = [c.name for c in value]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"candidate names must be unique; {', '.join(dup)} repeats. "
                             "Rename one")
        return value


class HubSettings(_Section):
    """Where a checkpoint that passed the gate is published."""

    repo_id: str | None = Field(
        None,
        description="Target model repo (owner/name). None: a dry run that writes what would be "
        "committed under the run's publish/ folder and publishes nothing.",
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
    )
    private: bool = Field(True, description="Create the repo private (when it does not exist).")
    endpoint: str | None = Field(
        None, description="Hub URL; None: $HF_ENDPOINT, else https://huggingface.co."
    )
    token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the token; None: $HF_TOKEN. The "
        "token itself is never a setting.",
    )
    branch: str = Field("main", description="Branch the candidate is committed to.")
    production_ref: str = Field(
        "production",
        description="Branch that marks the promoted revision; moved only after a verified "
        "rollout.",
    )
    secret_env: list[str] = Field(
        default_factory=list, description="Environment variables of the worker whose values "
        "must never be published, beside the Hub token and every variable named like a secret "
        "(a publish scans every file for them: requant/hub/secrets_check.py).")
    retries: int = Field(2, ge=0, description="Retries of a failed upload (network, 5xx only).")
    retry_delay_s: float = Field(10, ge=0)


class SLOSettings(LoadSettings):
    """What a new deployment must sustain before traffic moves to it (the seed's load test)."""

    max_error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Failed / sent.")
    max_p95_latency_s: float | None = Field(
        120.0, gt=0, description="Ceiling on the p95 request latency (None: not checked)."
    )
    min_tokens_per_s: float | None = Field(
        None, gt=0, description="Floor on generated tokens per second (None: not checked)."
    )


class CanaryPhase(_Section):
    weight: float = Field(gt=0, lt=1, description="Share of live requests the new revision "
                          "answers in this phase (the serving revision answers the rest).")
    seconds: float = Field(gt=0, description="How long the phase lasts; it is judged all along.")


class _LiveRules(_Section):
    """What a live phase compares, new revision against serving revision, on the router's
    metrics; judged once the new revision answered ``min_requests`` in the phase."""

    min_requests: int = Field(
        20, gt=0, description="Requests the new revision must answer in the phase before it "
        "is judged, and by the phase's end (fewer: rolled back, not enough evidence).",
    )
    max_error_rate_increase: float = Field(
        0.01, ge=0, le=1, description="How much larger the new revision's share of failed "
        "answers may be than the serving revision's (in a shadow: copies it failed, or answered "
        "with another status, where the serving revision answered).",
    )
    max_p95_latency_ratio: float | None = Field(
        2.0, gt=0, description="The new revision's p95 latency at most this multiple of the "
        "serving revision's (in a shadow: on the same requests). None: not compared.",
    )


class CanarySettings(_LiveRules):
    """Live traffic in steps between the load test (or the shadow phase) and the switch (local
    target). Each phase rolls back at the first breach. No phases: no canary."""

    phases: list[CanaryPhase] = Field(
        default_factory=list,
        description="e.g. [{weight: 0.05, seconds: 120}, {weight: 0.25, seconds: 300}], then "
        "the switch (100 %). Empty: blue/green with no canary.",
    )
    poll_s: float = Field(1.0, gt=0, description="How often the router's metrics are read "
                          "(shadow and canary phases).")


class ShadowSettings(_LiveRules):
    """Copies of live requests answered by the new revision before it serves anyone (local
    target): its answers are compared with the serving revision's and thrown away."""

    seconds: float = Field(0, ge=0, description="How long the shadow phase lasts, before any "
                           "canary phase (0: no shadow phase).")
    share: float = Field(
        1.0, gt=0, le=1, description="Share of completion requests copied. Each copy is a "
        "second computation: on a host the two servers share, copy less.",
    )
    min_agreement: float | None = Field(
        0.8, ge=0, le=1, description="Share of greedy requests (temperature 0, not streamed) "
        "both revisions answer with the same text, judged on at least min_requests of them. "
        "None: not measured (traffic that samples).",
    )


class LocalTargetSettings(_Section):
    """Blue/green on this host: vLLM servers behind one stable router endpoint."""

    host: str = Field("127.0.0.1", description="Where the router (the stable endpoint) listens.")
    port: int = Field(8000, gt=0, lt=65536, description="The stable endpoint clients use.")
    max_request_bytes: int = Field(
        32 << 20, gt=0, description="The router answers 413 to a larger request body, without "
        "holding it (32 MiB: a 128k-token context as JSON with room to spare).")
    server: ServerSettings = Field(
        default_factory=lambda: ServerSettings(gpu_memory_utilization=0.4),
        description="The vLLM servers behind the router. On a GPU host they share it with the "
        "GPU stages and, during a switch, with each other: 0.4 each by default.",
    )
    drain_timeout_s: float = Field(
        300, ge=0, description="How long in-flight requests may finish on the old server."
    )
    keep_previous_s: float = Field(
        60, ge=0,
        description="After a switch, the previous revision's server stays up this long as the "
        "router's fallback: if the new one dies or fails its health checks meanwhile, requests "
        "go back to the previous one and the rollout is undone. 0: stop it as soon as it is "
        "drained.",
    )
    restart_server: bool = Field(
        True,
        description="A serving revision's vLLM that dies after it was ready is started again "
        "on the same port by a keeper process (requant.serving.keeper); the router answers 503 "
        "with Retry-After meanwhile, or sends requests to a still-warm previous revision. A "
        "server that never became ready, or fails 3 starts in a row, is not restarted.",
    )
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    supervisor: Literal["supervisord", "external"] = Field(
        "supervisord",
        description="What keeps the router up. supervisord: requant starts the router under "
        "its own supervisord (restarted within a second of any exit). external: systemd (see "
        "deployments/systemd/requant-router.service) or another supervisor runs it; requant "
        "only uses it, and fails a rollout with a clear error when it does not answer.",
    )


class ClusterRouterSettings(_Section):
    """requant's router in the cluster, in front of two vLLM Deployments (slots ``-a`` and
    ``-b``): a rollout fills the idle slot, runs the shadow and canary phases through the
    router, switches it, then drains and scales the other slot to 0 (docs/rollout.md,
    "Kubernetes: phases through the router in the cluster")."""

    enabled: bool = Field(False, description="Off: one Deployment, replaced in place (surge "
                          "first) with no live phases.")
    image: str = Field("ghcr.io/requant/serving:latest", description="The router's image "
                       "(docker/serving.Dockerfile).")
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    drain_timeout_s: float = Field(
        300, ge=0, description="How long in-flight requests may finish on the old slot before "
        "it is scaled to 0.")


class KubernetesTargetSettings(_Section):
    """A Deployment of the vllm/vllm-openai image, pinned to the published commit."""

    namespace: str = Field("requant", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    deployment: str = Field("vllm", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                            description="Deployment and Service name.")
    image: str = Field("vllm/vllm-openai:v0.32.0", description="The serving image.")
    replicas: int = Field(1, ge=1)
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per pod (0: CPU pods).")
    max_surge: int | str = Field(
        "100%", description="Extra pods during a rollout: the new pods start beside the old "
        "ones, which serve until the new ones are ready (needs that many spare GPUs)."
    )
    max_unavailable: int | str = Field(
        0, description="Pods that may be down during a rollout. Above 0 replaces pods in place: "
        "less capacity, and with replicas: 1 an outage while the new pod loads; needs "
        "allow_downtime: true."
    )
    allow_downtime: bool = Field(
        False, description="Accept in-place replacement (max_unavailable > 0) where no spare "
        "GPU exists: serving capacity drops during every rollout and undo."
    )
    max_model_len: int = Field(8192, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="Appended to vLLM's args.")
    hf_token_secret: str | None = Field(
        "hf-token", description="Kubernetes Secret (key 'token') mounted as HF_TOKEN; None: none."
    )
    model_cache_pvc: str | None = Field(
        None, description="PersistentVolumeClaim for the Hugging Face cache (None: emptyDir)."
    )
    startup_timeout_s: int = Field(
        1800, gt=0, description="Startup probe budget: model download + load + compile."
    )
    rollout_timeout_s: float = Field(2700, gt=0, description="Deadline for the whole rollout.")
    poll_interval_s: float = Field(5, gt=0)
    service_url: str | None = Field(
        None,
        description="URL of the Service as the worker reaches it, for the smoke and load test "
        "(None: in-cluster DNS, http://<deployment>.<namespace>.svc:8000).",
    )
    kubeconfig: Path | None = Field(
        None, description="None: in-cluster config if present, else ~/.kube/config."
    )
    context: str | None = None
    router: ClusterRouterSettings = Field(default_factory=ClusterRouterSettings)


class RolloutSettings(_Section):
    """Where a checkpoint that passed the gate is served, and what it must prove first."""

    target: Literal["none", "local", "kubernetes"] = Field(
        "local", description="local (the embedded default): blue/green on this host behind "
        "http://127.0.0.1:8000. kubernetes: a Deployment of vllm/vllm-openai. none: publish "
        "only."
    )
    trigger: Literal["inline", "deployment", "automation"] = Field(
        "inline",
        description="inline: the requantize flow runs the promote flow itself (a subflow, same "
        "process). deployment: it runs the promote deployment on the serving pool and waits "
        "(run_deployment). automation: it only emits requant.gate.passed and a Prefect "
        "automation runs the promote deployment (prefect.yaml).",
    )
    promote_deployment: str = Field(
        "promote/promote", description="flow/deployment name used by trigger=deployment."
    )
    served_model_name: str = Field(
        "requant-w8a8", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="The model name clients send; the same across revisions.",
    )
    state_dir: Path = Field(
        Path(".cache/requant/rollout"),
        description="Deployed-state records (revision, when, which run, previous) per target.",
    )
    smoke_prompt: str = "What is 12 + 30? Answer with a number."
    slo: SLOSettings = Field(default_factory=SLOSettings)
    local: LocalTargetSettings = Field(default_factory=LocalTargetSettings)
    kubernetes: KubernetesTargetSettings = Field(default_factory=KubernetesTargetSettings)


class PipelineSettings(_Section):
    """Everything one requantization run needs; the defaults are the offline demo."""

    source: SourceSettings = Field(default_factory=SourceSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    force: bool = Field(
        False,
        description="Re-run every stage even when this exact candidate (same source, recipe, "
        "calibration, settings, library versions) was already published. Off: such a run "
        "finishes at once and says so (the nightly no-op).",
    )
    output_dir: Path = Field(Path("runs"), description="Each run writes runs/<run-id>/.")
    cache_dir: Path = Field(
        Path(".cache/requant"), description="Prepared calibration sets, keyed by their inputs."
    )

    @field_validator("output_dir", "cache_dir")
    @classmethod
    def _not_empty(cls, value: Path) -> Path:
        if str(value).strip() in {"", "."}:
            raise ValueError("must name a directory other than the working directory")
        return value

    @model_validator(mode="after")
    def _no_secrets(self) -> PipelineSettings:
        from requant.secret_scan import refusal, secret_like_fields

        if found := secret_like_fields(self):
            raise ValueError(refusal(found))
        return self

    @model_validator(mode="after")
    def _search_needs_the_gate(self) -> PipelineSettings:
        if self.search.candidates and not self.evaluation.enabled:
            raise ValueError("search.candidates: the gate chooses between candidates, so a "
                             "search needs evaluation.enabled=true; enable it or remove the "
                             "candidates")
        return self

    @model_validator(mode="after")
    def _rules_name_evaluated_tasks(self) -> PipelineSettings:
        for i, rule in enumerate(self.gate.rules):
            if self.evaluation.enabled and rule.task not in self.evaluation.tasks:
                raise ValueError(f"gate.rules.{i}.task: {rule.task!r} is not evaluated; add it "
                                 f"to evaluation.tasks {self.evaluation.tasks} or gate on one of "
                                 "those")
        return self


# --------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides -> validated settings, with errors a person can act on.
# --------------------------------------------------------------------------------------------


def load_settings(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> PipelineSettings:
    """Read a YAML config (or the defaults) and apply ``section.field=value`` overrides.

    Override values are parsed as YAML scalars, so ``calibration.num_samples=128`` is an int and
    ``quantization.ignore=[lm_head, "re:.*gate"]`` a list.
    """
    data = read_config(Path(path)) if path is not None else {}
    apply_overrides(data, overrides)
    return validate_settings(data)


def read_config(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections, or one line naming the file and what is wrong."""
    if not path.is_file():
        raise SettingsError(f"config file {path}: not found. Pass an existing YAML file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path}: not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: top level must be a mapping of sections.")
    return data


def validate_settings(data: Mapping[str, Any] | PipelineSettings,
                      base: Path | None = None) -> PipelineSettings:
    """Validate raw settings, turning pydantic's report into one that names field and fix, and
    resolve every path in them against ``base`` (default: the directory the command runs in)."""
    if isinstance(data, PipelineSettings):
        data = data.model_dump()
    try:
        settings = PipelineSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None
    return resolve_paths(settings, base)


def resolve_paths(settings: PipelineSettings, base: Path | None = None) -> PipelineSettings:
    """Every path setting made absolute, once, here: downstream code (supervisord's config, a
    vLLM server started in another directory, lm-eval) then never sees a relative path, and the
    manifest records where things really were. A local model or dataset counts as a path when
    it exists (else it is a Hub id, left as is)."""
    base = Path.cwd() if base is None else base
    data = settings.model_dump()
    _absolute_in(PipelineSettings, data, base)
    for cand in data["search"]["candidates"]:
        if cand.get("recipe") is not None:
            cand["recipe"] = _absolute(Path(cand["recipe"]), base)
    for section, key in (("source", "model"), ("calibration", "dataset")):
        value = data[section][key]
        if _looks_local(value, base):
            data[section][key] = str(_absolute(Path(value), base))
    return PipelineSettings.model_validate(data)


def _absolute_in(model: type[BaseModel], data: dict[str, Any], base: Path) -> None:
    for name, field in model.model_fields.items():
        value = data.get(name)
        if isinstance(value, Path):
            data[name] = _absolute(value, base)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            data[name] = [_absolute(v, base) for v in value]
        elif isinstance(value, dict) and (sub := _section_type(field.annotation)):
            _absolute_in(sub, value, base)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _looks_local(value: str, base: Path) -> bool:
    path = Path(value).expanduser()
    return value.startswith(("/", "./", "../", "~")) or (base / path).exists()


def format_validation_error(exc: ValidationError) -> str:
    return describe_errors(exc, "invalid pipeline settings")


def describe_errors(exc: ValidationError, header: str) -> str:
    """pydantic's report as one line per field, each with the value and the fix."""
    lines = [f"{header}:"]
    for err in exc.errors():
        if not err["loc"]:  # a cross-field check: its message names the field and the fix
            lines.append(f"  - {err['msg'].removeprefix('Value error, ')}.")
            continue
        field = ".".join(str(p) for p in err["loc"])
        fix = _FIXES.get(err["type"], "")
        got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        lines.append(f"  - {field}: {err['msg']}{got}.{(' ' + fix) if fix else ''}")
    return "\n".join(lines)


_FIXES = {
    "extra_forbidden": "Remove it, or check its spelling against `requant settings-schema`.",
    "greater_than": "Set a larger value.",
    "greater_than_equal": "Set a larger value.",
    "less_than": "Set a smaller value.",
    "less_than_equal": "Set a smaller value.",
    "literal_error": "Use one of the values listed.",
    "string_pattern_mismatch": "Use a name or value of the form shown (a run request's values "
    "are names the worker's profile offers: `requant settings-schema --run`).",
}


def apply_overrides(data: dict[str, Any], items: Sequence[str]) -> None:
    """``section.field=value`` items into ``data``; values are YAML scalars."""
    for item in items:
        _apply_override(data, item)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"override {item!r}: expected section.field=value.")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"override {item!r}: {part} is not a section.")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
