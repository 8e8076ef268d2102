"""Shared fixtures: a tiny real Llama (random weights, trained BPE tokenizer, chat template), tiny
calibration files, and a real Prefect server (SQLite) for the tests that run flows."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
GSM8K_TRAIN = ROOT / "data" / "gsm8k" / "train.jsonl"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The fake Hub (tests/fakehub.py) speaks the classic LFS upload protocol, not Xet; this is the
# client's own switch, read when huggingface_hub is imported.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prefect's console log handler writes to the sys.stderr of the moment Prefect sets up its
# logging. Set up here, while pytest collects, that is pytest's own capture stream, open for the
# whole session. Set up first inside a test (the CLI imports Prefect lazily) it was that test's
# capsys stream, closed when the test ended, and every later test in the same xdist worker then
# failed on logging to it ("I/O operation on closed file"), depending on test order.
import prefect.main  # noqa: E402, F401

_SPENT: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    """Each slow test's time (set-up + call + teardown) printed as soon as it ends, so a CI run
    cut off by its time limit still shows where its time went (--durations prints only at the
    end)."""
    _SPENT[report.nodeid] = _SPENT.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown" and "slow" in report.keywords:
        reporter = _CONFIG[0].pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
        if reporter is not None and reporter.verbosity > 0:
            reporter.write(f" ({_SPENT.pop(report.nodeid):.0f} s)")


_CONFIG: list = []


def pytest_configure(config) -> None:
    _CONFIG.append(config)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gsm8k_rows(n: int) -> list[dict]:
    rows = []
    with GSM8K_TRAIN.open() as fh:
        for line, _ in zip(fh, range(n), strict=False):
            rows.append(json.loads(line))
    return rows


def build_tiny_llama(
    path: Path, *, chat_template: bool = True, vocab_size: int = 384, layers: int = 2,
    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
) -> Path:
    """A real LlamaForCausalLM small enough that llm-compressor's oneshot takes seconds on a CPU."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(300)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", add_bos_token=True,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_without_chat_template(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-plain", chat_template=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in gsm8k_rows(n)]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))


@pytest.fixture
def text_file(tmp_path) -> Path:
    rows = [{"body": r["question"] + " " + r["answer"], "id": i}
            for i, r in enumerate(gsm8k_rows(40))]
    return write_jsonl(tmp_path / "text.jsonl", rows)


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect server (uvicorn + SQLite in a temp dir) for this test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---- real vLLM (serving environment) ---------------------------------------------------------

SERVING_PYTHON = ROOT / ".venvs" / "serving" / "bin" / "python"
needs_vllm = pytest.mark.skipif(
    not SERVING_PYTHON.exists() and not os.environ.get("REQUANT_SERVING_PYTHON"),
    reason="serving environment missing: make serving-env",
)


@pytest.fixture(scope="session")
def vllm_tiny_source(tmp_path_factory) -> Path:
    """A tiny Llama whose shapes vLLM's CPU kernels accept (head_dim 64)."""
    path = tmp_path_factory.mktemp("models") / "tiny-vllm-bf16"
    return build_tiny_llama(path, layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512)


@pytest.fixture(scope="session")
def vllm_tiny_w8a8(vllm_tiny_source, tmp_path_factory) -> Path:
    """The tiny source quantized by the pipeline's own stage: a real compressed-tensors W8A8."""
    from requant.calibration import build_calibration_set
    from requant.quantization.checkpoint import quantize_checkpoint
    from requant.quantization.hardware import Accelerator
    from requant.quantization.recipes import resolve_recipe
    from requant.settings import PipelineSettings
    from requant.source import resolve_source_files

    work = tmp_path_factory.mktemp("w8a8")
    data = work / "calib.jsonl"
    write_jsonl(data, [{"text": r["question"]} for r in gsm8k_rows(16)])
    settings = PipelineSettings.model_validate({
        "source": {"model": str(vllm_tiny_source)},
        "calibration": {"dataset": str(data), "num_samples": 16, "max_seq_len": 128},
    })
    source = resolve_source_files(settings.source, with_weights=False)
    calib = build_calibration_set(settings.calibration, source, work / "cache")
    ckpt = quantize_checkpoint(settings, source, calib, resolve_recipe(settings.quantization),
                               Accelerator("cpu", "test"), work / "checkpoint", {})
    return ckpt.path


def tiny_server_settings(**overrides):
    from requant.settings import ServerSettings

    return ServerSettings(**{"max_model_len": 1024, "max_num_seqs": 8,
                             "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                             "startup_timeout_s": 300, "stop_grace_s": 15, **overrides})


def tiny_settings(tmp_path: Path, model: Path, **sections) -> dict:
    """The kit's settings for a whole run of a tiny model: 8 calibration rows, 4 gsm8k
    questions on a small server, a gate that lets the honest inconclusive through, output and
    cache under ``tmp_path``; ``sections`` replace whole sections."""
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": r["question"]} for r in gsm8k_rows(8)])
    base = {
        "source": {"model": str(model)},
        "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128},
        "evaluation": {"tasks": ["gsm8k_local"], "task_limits": {}, "limit": 4,
                       "num_fewshot": 0, "max_gen_toks": 16,
                       "server": tiny_server_settings().model_dump(mode="json")},
        # a random tiny model scores 0 on gsm8k: no loss can be shown, so the rule asks no
        # minimum baseline and the run lets the (honest) inconclusive through
        "gate": {"rules": [{"task": "gsm8k_local", "min_baseline": 0.0}], "looks": [1.0],
                 "allow_inconclusive": True},
        "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
    }
    return base | sections


def processes_mentioning(*texts: str) -> list:
    """Processes whose command line mentions every one of ``texts``. Name what only this test
    started (its tmp_path, its model's path): a bare served-model name also matches servers
    that something else on the machine started (another test session, a demo)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            parts = proc.info["cmdline"] or []
            if all(any(text in part for part in parts) for text in texts):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_answering(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Until ``url`` answers anything over HTTP (a test's server just started), failing at
    once if ``alive()`` says it died."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline and alive(), f"{url} did not answer"
            time.sleep(0.1)


def wait_until(probe, timeout_s: float, what: str, every_s: float = 0.1):
    """Poll ``probe`` until it returns something true, and return that; fail naming ``what``
    after ``timeout_s``. The one way tests wait for observable state."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (found := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout_s} s")
        time.sleep(every_s)
    return found


def requantize(settings, **request):
    """The requantize flow as the CLI runs it: ``settings`` are the worker's profile (handed over
    in-process) and ``request`` the run's (a RunRequest's fields)."""
    from requant.flows.requantize import requantize as flow
    from requant.profile import OperatorProfile, using
    from requant.run_request import RunRequest

    with using(OperatorProfile.of(settings)):
        return flow(RunRequest.model_validate(request))


def promote(settings, revision=None, checkpoint=None, rollback=False, force=False,
            request=None, **allow):
    """The promote flow as the CLI runs it, ``settings`` as the worker's profile (``allow``: its
    allow section, e.g. checkpoints=[folder])."""
    from requant.flows.promote import promote as flow
    from requant.profile import OperatorProfile, using
    from requant.run_request import RunRequest

    if checkpoint is not None:
        allow.setdefault("checkpoints", [Path(checkpoint).resolve().parent])
    with using(OperatorProfile.of(settings, **allow)):
        return flow(RunRequest.model_validate(request or {}), revision=revision,
                    checkpoint=None if checkpoint is None else str(checkpoint),
                    rollback=rollback, force=force)


class ClientLoad:
    """The kit's load client: a bounded loop of chat completions through an endpoint, on a
    thread; what answered (with the revision header), what failed and when."""

    def __init__(self, url: str, max_requests: int = 20_000, pause_s: float = 0.05) -> None:
        self.url, self.max_requests, self.pause_s = url, max_requests, pause_s
        self.ok = 0
        self.failures: list[str] = []
        self.failed_at: list[float] = []  # time.monotonic() of each failure's answer
        self.revisions: list[str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        from requant.serving.router import REVISION_HEADER

        with httpx.Client(timeout=60) as client:
            for _ in range(self.max_requests):
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": "tiny-chat", "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": "Hi"}]})
                    if r.status_code == 200 and r.json()["choices"]:
                        self.ok += 1
                        self.revisions.append(r.headers.get(REVISION_HEADER, ""))
                        self.latencies.append(time.perf_counter() - started)
                    else:
                        self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        self.failed_at.append(time.monotonic())
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.failures.append(repr(exc))
                    self.failed_at.append(time.monotonic())
                self._stop.wait(self.pause_s)

    def __enter__(self) -> ClientLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
