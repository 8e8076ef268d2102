"""Slow: the README's first command, `make demo`, exactly as written, in a fresh copy of the
project (an empty cache, no --set, no path or port overrides, run from the copy's root), then
what the README tells a user to do next: `requant status`, a chat request to the stable
endpoint on :8000, `requant down` and `make prefect-down`. The copy shares only what `make test`
built before it and `make demo` would find up to date: the two environments and the demo model.

Then the README's search command runs in the same copy, reusing the demo's baseline from the
copy's own cache (as a nightly run would)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from requant.quantization.verification import saved_tensors

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
ENDPOINT = "http://127.0.0.1:8000"  # the README's, not a free port: the default is the test
DEMO_DEADLINE_S = 40 * 60
SEARCH_DEADLINE_S = 35 * 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.solo,  # `make demo`'s evaluations keep both cores busy for 20 minutes
    pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                       reason="demo model not built: run `make demo-model`"),
]


def fresh_copy(dest: Path) -> Path:
    """The project's files as a clone has them (tracked, and new files not ignored), plus links
    to the environments and the demo model that `make demo`'s first steps check and keep."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
                           ).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venvs").symlink_to(ROOT / ".venvs")
    (dest / "models").symlink_to(ROOT / "models")
    return dest


def user_env(copy: Path) -> dict[str, str]:
    """A user's shell: nothing this test session set for Prefect or requant, and the README's
    `.venvs/pipeline/bin` on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "REQUANT_", "PYTEST_"))}
    env["PATH"] = f"{copy / '.venvs' / 'pipeline' / 'bin'}:{env.get('PATH', '')}"
    return env


def environments_are_current() -> bool:
    """The stamp scripts/setup_envs.sh writes: a stale pipeline environment would be reinstalled
    by the copy's `make demo`, through the link, as an editable install of the copy."""
    import hashlib

    want = hashlib.sha256((ROOT / "constraints" / "pipeline.txt").read_bytes()
                          + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = ROOT / ".venvs" / "pipeline" / ".requant-stamp"
    return stamp.is_file() and stamp.read_text().strip() == want


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not environments_are_current():
        pytest.fail("the environments are older than constraints/ and pyproject.toml: run "
                    "`make envs` first (`make test` does)")
    copy = fresh_copy(tmp_path_factory.mktemp("fresh-clone") / "requant")
    env = user_env(copy)
    try:
        done = subprocess.run(["make", "demo"], cwd=copy, env=env, capture_output=True,
                              text=True, timeout=DEMO_DEADLINE_S)
        yield copy, env, done
    finally:
        subprocess.run(["requant", "down"], cwd=copy, env=env, timeout=120, check=False)
        subprocess.run(["make", "prefect-down"], cwd=copy, env=env, timeout=120, check=False)


def test_make_demo_as_shipped_quantizes_passes_the_gate_for_real_and_serves_on_8000(demo):
    copy, env, done = demo
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = Path(re.search(r"^run directory: (.+)$", done.stdout, re.M).group(1))
    assert run_dir.parent == copy / "runs"  # relative defaults, resolved in the copy
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    group = json.loads((ckpt / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"]) == ("int", 8)
    act = group["input_activations"]
    assert (act["type"], act["num_bits"], act["dynamic"], act["strategy"]) == ("int", 8, True, "token")
    assert summary["verification"] == {"ok": True, "problems": [], "quantized_linear": 210,
                                       "ignored_linear": ["lm_head"], "reload_ok": True}
    assert len([k for k, v in saved_tensors(ckpt).items() if v == "I8"]) == 210  # 30 x 7
    assert summary["calibration"]["stats"]["samples"] == 64
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["settings"]["quantization"]["smoothing_strength"] == 0.8
    assert manifest["settings"]["rollout"]["state_dir"] == str(copy / ".cache/requant/rollout")
    assert (ckpt / "chat_template.jinja").is_file()

    # The demo's real decision: the cloze rule passes on its 652 questions' plan, without
    # allow_inconclusive; gsm8k (about 0 for this model) still runs.
    gate = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert (gate["status"], gate["promote"]) == ("pass", True), gate["reasons"]
    (rule,) = gate["rules"]
    assert (rule["task"], rule["metric"], rule["status"]) == ("gsm8k_cloze_local", "acc,none",
                                                              "pass")
    assert rule["total"] == 652 and rule["interval"]["low"] > rule["min_recovery"]
    # the baseline answered what the decision needed, the same questions as the candidate
    asked = gate["candidate"]["questions"]["gsm8k_cloze_local|acc,none"]
    assert gate["baseline"]["questions"]["gsm8k_cloze_local|acc,none"] == asked
    # the baseline answered a stage only when a look needed it: as many as the candidate
    assert gate["baseline"]["stages"] == gate["candidate"]["stages"] == gate["look"]
    assert "gsm8k_local|exact_match,strict-match" in gate["candidate"]["questions"]
    assert "Int8" in (run_dir / "eval" / "candidate" / "server.log").read_text()
    assert summary["publish"]["dry_run"] is True
    assert "nothing was published" in (run_dir / "publish" / "DRY_RUN.md").read_text()

    # What the README says a user does next, exactly.
    status = subprocess.run(["requant", "status"], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    assert summary["rollout"]["deployed"]["release"]["revision"] in status.stdout
    served = httpx.get(f"{ENDPOINT}/v1/models", timeout=10).json()["data"][0]
    assert served["id"] == "requant-w8a8" and served["root"] == str(ckpt.resolve())
    answer = httpx.post(f"{ENDPOINT}/v1/chat/completions", timeout=60, json={
        "model": "requant-w8a8", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is 2 + 2?"}]}).json()
    assert answer["choices"][0]["message"]["content"]
    assert summary["rollout"]["deployed"]["verification"]["load"]["errors"] == 0
    down = subprocess.run(["requant", "down"], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0 and "stopped the local deployment" in down.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ENDPOINT}/v1/models", timeout=5)
    # the demo's Prefect server is where the CLI's commands go while it is up
    record = copy / ".cache" / "prefect" / "api-url"
    assert record.read_text().strip().startswith("http://127.0.0.1:")
    stopped = subprocess.run(["make", "prefect-down"], cwd=copy, env=env, capture_output=True,
                             text=True, timeout=120)
    assert stopped.returncode == 0 and "Prefect server stopped" in stopped.stdout
    assert not record.exists()


def test_the_readmes_search_command_on_smollm2_publishes_the_smallest_that_passes(
        demo, prefect_server):
    """The README's search command exactly as written, in the same copy after `make demo` (a
    nightly search after the single run: the baseline comes from the copy's cache): three real
    candidates of SmolLM2-135M on the CPU. The planted broken one (SmoothQuant mappings that do
    not match the model) is stopped by the exactness check, naming the mapping; both good ones
    are quantized and the smaller is gated first and passes, so the other is recorded and never
    evaluated. The smaller is the demo's own candidate, quantized again to the same bytes: its
    answers come from the candidate cache, so no candidate server starts unless the split level
    needs a stage the demo did not answer. Where it passes depends on the host's bf16 kernels: at the split on the Intel
    hosts, only on the whole set on an AMD EPYC host (2026-12-01: score statistic +2.44 at the
    split, short of the Bonferroni-corrected boundary; +4.09 on the whole set against 2.14),
    where the baseline answers the second stage too; the table and plot are artifacts on a real Prefect server
    and the card lists the alternatives. Nothing is deployed (the config's rollout is none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    copy, env, done = demo
    assert done.returncode == 0, "the search reuses the demo's baseline: see the demo's test"
    env = {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the UI this test reads
    searched = subprocess.run(
        ["requant", "run", "--config", "deployments/configs/search-demo.yaml"], cwd=copy,
        env=env, capture_output=True, text=True, timeout=SEARCH_DEADLINE_S)
    assert searched.returncode == 0, searched.stdout[-4000:] + searched.stderr[-4000:]
    run_dir = Path(re.search(r"^run directory: (.+)$", searched.stdout, re.M).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    # the demo's baseline reused: its first stage byte for byte (lm-eval's results carry the
    # time they were made), so never answered again
    demo_run = Path(re.search(r"^run directory: (.+)$", done.stdout, re.M).group(1))
    first = Path("eval") / "baseline" / "results_gsm8k_cloze_local_stage1.json"
    assert (run_dir / first).read_bytes() == (demo_run / first).read_bytes()

    record = summary["search"]
    assert (record["objective"], record["winner"]) == ("smallest", "w8a8-sq08")
    by_name = {o["name"]: o for o in record["outcomes"]}
    assert by_name["planted-broken"]["status"] == "error"
    assert "SmoothQuant changed the model" in by_name["planted-broken"]["why"]
    assert by_name["w8a8-sq08"]["status"] == "pass"
    assert by_name["w8a8-lm-head"]["status"] == "not run"
    assert by_name["w8a8-sq08"]["size_bytes"] < by_name["w8a8-lm-head"]["size_bytes"]
    winner = run_dir / "candidates" / "w8a8-sq08"
    decision = json.loads((winner / "gate" / "decision.json").read_text())
    assert decision["promote"] is True
    # the demo's own candidate, quantized again to the same bytes: its answers were read back
    # from the candidate cache (cut look by look), not asked of a server again
    weights = Path("checkpoint") / "model.safetensors"
    assert (winner / weights).read_bytes() == (demo_run / weights).read_bytes()
    assert json.loads((winner / "eval" / "candidate" / "cache.json").read_text())["stages"] >= 1
    if decision["look"] == 1:  # decided at the split: the baseline came whole from the cache
        assert (run_dir / "eval" / "baseline" / "cache.json").is_file()
    else:  # undecided there (see the docstring): the baseline answered the second stage only
        assert json.loads((run_dir / "eval" / "baseline" / "summary.json").read_text())[
            "stages"] == 2
    assert decision["thresholds"]["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert summary["checkpoint"] == str(winner / "checkpoint")
    assert not list((run_dir / "candidates" / "planted-broken").glob("checkpoint/*.safetensors"))
    assert not (run_dir / "candidates" / "w8a8-lm-head" / "gate").exists()

    card = (run_dir / "publish" / "README.md").read_text()
    assert "## Alternatives tried" in card and "candidate **w8a8-sq08** of 3" in card
    assert "| planted-broken |" in card and "| w8a8-lm-head | ignore=[] |" in card
    assert summary["publish"]["dry_run"] is True and not summary.get("rollout")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[summary["run_id"]])))
    by_key = {a.key: a for a in artifacts}
    assert "w8a8-sq08 (winner)" in str(by_key["search-candidates"].data)
    assert "data:image/svg+xml;base64," in by_key["search"].data
