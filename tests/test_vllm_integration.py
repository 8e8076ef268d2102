"""Real vLLM servers (serving environment, CPU) on a tiny W8A8 checkpoint made by the pipeline.

Each test starts at least one server (about a minute on 2 cores), so they are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from requant.errors import ServerError
from requant.serving.server import free_port, start_server
from requant.settings import EvaluationSettings, GateRule, GateSettings, ServerSettings
from tests.conftest import ROOT, needs_vllm, processes_mentioning, tiny_server_settings

pytestmark = [pytest.mark.slow, needs_vllm]


def assert_no_server_left(handle) -> None:
    assert handle.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(handle.process.pid, 0)  # the whole process group is gone, engine included
    assert processes_mentioning(handle.served_model_name) == []


def test_checkpoint_vllm_cannot_load_fails_with_the_log_and_leaves_nothing(vllm_tiny_w8a8,
                                                                           tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(vllm_tiny_w8a8, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServerError) as err:
        start_server(broken, tiny_server_settings(), tmp_path / "server.log",
                     served_name="tiny-broken")
    msg = str(err.value)
    assert "exited with code" in msg and "last" in msg and "server.log" in msg
    assert "NoSuchModelForCausalLM" in msg
    assert processes_mentioning("tiny-broken") == []


def test_server_killed_mid_evaluation_is_reported_as_a_server_failure(vllm_tiny_w8a8, tmp_path):
    """lm-eval must not turn a dead server into a score of zero."""
    from requant.evaluation.staged import EvalJob, evaluate_staged

    port = free_port()
    cfg = EvaluationSettings(tasks=["gsm8k_local"], task_limits={}, limit=40, num_fewshot=5, max_gen_toks=64, num_concurrent=2,
                             server=tiny_server_settings(port=port))

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(3)  # evaluation requests are in flight by now
        for proc in processes_mentioning("vllm.entrypoints.openai.api_server", str(port)):
            cmd = proc.cmdline()
            if cmd[cmd.index("--port") + 1] == str(port):  # not another test's server
                os.killpg(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    out = tmp_path / "eval" / "candidate"
    with pytest.raises(ServerError, match="exited with code"):
        evaluate_staged(EvalJob(cfg, GateSettings(looks=[1.0]), on_gpu=False), "candidate",
                        vllm_tiny_w8a8, out)
    killer.join(5)
    assert not out.exists()  # no result directory that could be mistaken for a finished one
    assert processes_mentioning("requant-candidate", str(vllm_tiny_w8a8)) == []


def bos_first(result_dir: Path) -> list[str]:
    """The first token id of every prompt vLLM logged (VLLM_LOGGING_LEVEL=DEBUG)."""
    return re.findall(r"prompt_token_ids: \[(\d+)", (result_dir / "server.log").read_text())


def logging_server(**kw) -> ServerSettings:
    # Room for the whole prompt: lm-eval truncates long prompts from the left, which would cut
    # the BOS off with the oldest tokens.
    return tiny_server_settings(max_model_len=2048,
                                extra_args=["--enable-log-requests", "--max-log-len", "8"],
                                env={"VLLM_CPU_KVCACHE_SPACE": "1",
                                     "VLLM_LOGGING_LEVEL": "DEBUG"}, **kw)


@pytest.mark.usefixtures("prefect_server")
def test_staged_gsm8k_slice_gated_with_bos_the_baseline_answering_stages_only_as_needed_and_cached(
        vllm_tiny_source, vllm_tiny_w8a8, tmp_path, monkeypatch):
    from requant.tasks.evaluation import evaluate_baseline, evaluate_candidate

    monkeypatch.chdir(ROOT)
    cfg = EvaluationSettings(tasks=["gsm8k_local"], task_limits={}, limit=8, num_fewshot=2, max_gen_toks=32, num_concurrent=4,
                             server=logging_server())
    gate = GateSettings(rules=[GateRule(task="gsm8k_local", min_baseline=0.0)],
                        looks=[0.5, 1.0], allow_inconclusive=True)
    record = {"model": str(vllm_tiny_source), "revision": None, "files": {"m": "1"}}
    base = evaluate_baseline(cfg, gate, record, vllm_tiny_source, tmp_path / "cache",
                             tmp_path / "run1" / "baseline", False)
    key = "gsm8k_local|exact_match,strict-match"
    assert base.stages == 1 and len(base.per_doc[key]) == 4  # only what look 1 needs
    cand, decision, base = evaluate_candidate(cfg, gate, base, vllm_tiny_w8a8,
                                              tmp_path / "run1" / "candidate", False, record,
                                              vllm_tiny_source, tmp_path / "cache")
    # look 1 undecided: the baseline answered stage 2, then the candidate continued
    assert base.stages == 2 and sorted(base.per_doc[key]) == list(range(8))
    # a random tiny model scores 0 on both sides: undecided after look 1, inconclusive at 2
    assert (decision.look, decision.looks, decision.status) == (2, 2, "inconclusive")
    assert sorted(cand.per_doc[key]) == list(range(8))
    for result in (base, cand):
        assert set(result.per_doc) >= {key, "gsm8k_local|exact_match,flexible-extract"}
        assert "server_startup" in result.timings_s
        files = {p.name for p in result.result_dir.iterdir()}
        assert {"results_gsm8k_local_stage1.json", "results_gsm8k_local_stage2.json",
                "samples_gsm8k_local.jsonl", "server.log", "summary.json", "per_doc.json",
                "tasks"} <= files
        samples = [json.loads(line) for line in
                   (result.result_dir / "samples_gsm8k_local.jsonl").read_text().splitlines()]
        assert {(s["doc_id"], s["filter"]) for s in samples} == {
            (d, f) for d in range(8) for f in ("strict-match", "flexible-extract")}
        # add_bos_token reached the server: every logged prompt starts with BOS (<s> = 1).
        firsts = bos_first(result.result_dir)
        assert len(firsts) >= 8 and set(firsts) == {"1"}, firsts
    started = time.monotonic()
    again = evaluate_baseline(cfg, gate, record, vllm_tiny_source, tmp_path / "cache",
                              tmp_path / "run2" / "baseline", False)
    assert again.cached and time.monotonic() - started < 30  # no server was started
    # both stages were cached, the second one added by the candidate's undecided look
    assert again.per_doc == base.per_doc and again.evaluated_with == base.evaluated_with
    assert (tmp_path / "run2" / "baseline" / "cache.json").is_file()
    # the same checkpoint again: its answers read back look by look, no server started
    started = time.monotonic()
    cand2, decision2, _ = evaluate_candidate(cfg, gate, again, vllm_tiny_w8a8,
                                             tmp_path / "run2" / "candidate", False, record,
                                             vllm_tiny_source, tmp_path / "cache")
    assert cand2.cached and time.monotonic() - started < 30
    assert cand2.per_doc == cand.per_doc and cand2.stages == 2
    assert (decision2.look, decision2.status) == (decision.look, decision.status)
    assert json.loads((tmp_path / "run2" / "candidate" / "cache.json").read_text())[
        "stages"] == 2


def test_add_bos_token_false_is_the_negative_control_no_prompt_starts_with_bos(
        vllm_tiny_w8a8, tmp_path, monkeypatch):
    from requant.evaluation.staged import EvalJob, evaluate_staged

    monkeypatch.chdir(ROOT)
    cfg = EvaluationSettings(tasks=["gsm8k_local"], task_limits={}, limit=4, num_fewshot=2, max_gen_toks=8, add_bos_token=False,
                             server=logging_server())
    result = evaluate_staged(EvalJob(cfg, GateSettings(looks=[1.0]), on_gpu=False),
                             "candidate", vllm_tiny_w8a8, tmp_path / "candidate")
    firsts = bos_first(result.result_dir)
    assert len(firsts) >= 4 and "1" not in firsts, firsts  # the same path, no BOS this time


def test_in_process_vllm_backend_runs_the_seed_command_in_the_serving_env(vllm_tiny_w8a8,
                                                                          tmp_path, monkeypatch):
    """evaluation.backend=vllm: `lm_eval --model vllm ... add_bos_token=True` as the seed ran it."""
    from requant.evaluation.staged import EvalJob, evaluate_staged

    monkeypatch.chdir(ROOT)
    cfg = EvaluationSettings(backend="vllm", tasks=["gsm8k_local"], task_limits={}, limit=4, num_fewshot=1, max_gen_toks=16,
                             server=tiny_server_settings(max_model_len=2048))
    result = evaluate_staged(EvalJob(cfg, GateSettings(), on_gpu=False), "candidate",
                             vllm_tiny_w8a8, tmp_path / "candidate")
    assert result.stages == 1  # one go: a stage would reload the model in-process
    assert sorted(result.per_doc["gsm8k_local|exact_match,strict-match"]) == [0, 1, 2, 3]
    log = (tmp_path / "candidate" / "lm_eval.log").read_text()
    assert "add_bos_token=True" in log or "'add_bos_token': True" in log
    assert (tmp_path / "candidate" / "results_stage1.json").is_file()
    assert (tmp_path / "candidate" / "per_doc.json").is_file()
