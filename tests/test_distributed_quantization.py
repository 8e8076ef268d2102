"""quantization.gpus > 1 on the CPU: real torchrun, two gloo ranks, real llm-compressor.

What a GPU run changes is the backend (NCCL) and the devices, not the code path: the ranks, the
sharding, the cross-rank merges (requant's single pass by default, llm-compressor's pipeline
for what it does not cover), rank 0's save inside the parent's atomic directory, and every way a
rank can end are the same.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from requant.calibration import build_calibration_set
from requant.errors import QuantizationFailed, SettingsError
from requant.processes import pid_running
from requant.quantization.checkpoint import quantize_checkpoint
from requant.quantization.distributed import shard_bounds
from requant.quantization.hardware import Accelerator, check_gpu_count
from requant.quantization.recipes import resolve_recipe
from requant.quantization.smoothing import fit_to_model
from requant.settings import PipelineSettings
from requant.source import resolve_source_files

CPU = Accelerator("cpu", "test-cpu")
SAMPLES = 16


def settings_for(model: Path, data: Path, gpus: int,
                 pipeline: str = "single-pass") -> PipelineSettings:
    return PipelineSettings.model_validate({
        "source": {"model": str(model)},
        "calibration": {"dataset": str(data), "num_samples": SAMPLES, "max_seq_len": 128},
        "quantization": {"gpus": gpus, "device": "cpu", "verify_reload": False,
                         "pipeline": pipeline},
    })


def quantize(model: Path, data: Path, cache: Path, out: Path, gpus: int,
             pipeline: str = "single-pass"):
    settings = settings_for(model, data, gpus, pipeline)
    source = resolve_source_files(settings.source, with_weights=False)
    calib = build_calibration_set(settings.calibration, source, cache)
    recipe = fit_to_model(resolve_recipe(settings.quantization), "llama")  # as the task does
    return quantize_checkpoint(settings, source, calib, recipe, CPU, out, {"flow_run_id": "t"})


def int8_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """One single-process run and two 2-rank runs of the same inputs, requant's single pass
    (the default); module-scoped, about a minute."""
    root = tmp_path_factory.mktemp("dist")
    data = root / "chat.jsonl"
    from tests.conftest import chat_rows, write_jsonl

    write_jsonl(data, chat_rows(SAMPLES + 8))
    single = quantize(tiny_model, data, root / "cache", root / "one" / "checkpoint", 1)
    two_a = quantize(tiny_model, data, root / "cache", root / "two-a" / "checkpoint", 2)
    two_b = quantize(tiny_model, data, root / "cache", root / "two-b" / "checkpoint", 2)
    return single, two_a, two_b


@pytest.fixture(scope="module")
def pipeline_runs(tiny_model, tmp_path_factory):
    """Two 2-rank runs through llm-compressor's own pipeline (recipes the single pass does not
    cover take it), its data-parallel path made exact by requant.quantization.rank_safe."""
    root = tmp_path_factory.mktemp("dist-pipeline")
    data = root / "chat.jsonl"
    from tests.conftest import chat_rows, write_jsonl

    write_jsonl(data, chat_rows(SAMPLES + 8))
    return [quantize(tiny_model, data, root / "cache", root / name / "checkpoint", 2,
                     "llm-compressor") for name in ("a", "b")]


def test_shards_are_contiguous_cover_every_sample_once_and_differ_by_at_most_one():
    for n, world in [(16, 2), (17, 4), (512, 8), (5, 5)]:
        bounds = shard_bounds(n, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        sizes = [e - s for s, e in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_two_ranks_write_a_verified_checkpoint_recording_ranks_and_shards(runs):
    _, two, _ = runs
    m = json.loads((two.path / "manifest.json").read_text())
    assert m["verification"]["ok"]
    assert m["distributed"]["ranks"] == 2 and m["distributed"]["backend"] == "gloo"
    assert m["distributed"]["shards"] == [[0, 8], [8, 16]]
    assert [r["rank"] for r in m["distributed"]["peak_memory_gib"]] == [0, 1]
    # the model read once (#24 §2): rank 1 built a skeleton and received every module
    assert [r["weights"] for r in m["distributed"]["peak_memory_gib"]] == [
        "read from disk, sent to 1 rank(s)", "received from rank 0, a module at a time"]
    assert m["smoothing_check"]["max_layer_update_rel_change"] <= m["smoothing_check"]["layer_tolerance"]
    assert sorted(p.name for p in two.path.parent.iterdir()) == ["checkpoint"]  # no rank leftovers


def code_agreement(a: Path, b: Path, scale_rtol: float = 1e-2) -> tuple[float, int]:
    """(share of INT8 weight codes equal, largest difference in steps) between two checkpoints;
    every weight scale within ``scale_rtol`` of the largest (bf16 scales: one step is ~0.4 %)."""
    t1, t2 = int8_tensors(a), int8_tensors(b)
    assert t1.keys() == t2.keys()
    codes = [k for k in t1 if not t1[k].dtype.is_floating_point]
    same = sum(int((t1[k] == t2[k]).sum()) for k in codes)
    worst = max(int((t1[k].int() - t2[k].int()).abs().max()) for k in codes)
    for k in (k for k in t1 if k.endswith("weight_scale")):
        assert (t1[k].float() - t2[k].float()).abs().max() <= scale_rtol * t1[k].float().abs().max()
    return same / sum(t1[k].numel() for k in codes), worst


def test_two_ranks_of_the_single_pass_match_one_process_up_to_the_hessian_sum_order(runs):
    """The ranges' min/max merge is order-free, so the smoothing scales are one process's;
    the Hessians are sums in another float order (~1e-7 relative), which can move a weight on
    a rounding boundary by one step. #24's bound: >= 99 % of codes equal, at most one step,
    GPTQ's loss within 0.1 %."""
    single, two_a, two_b = runs
    one = json.loads((single.path / "manifest.json").read_text())["hardware"]
    for two in (two_a, two_b):
        share, worst = code_agreement(single.path, two.path)
        assert share >= 0.99, f"only {share:.4%} of INT8 codes equal"
        assert worst <= 1, f"an INT8 code moved by {worst} steps"
        manifest = json.loads((two.path / "manifest.json").read_text())
        choices = manifest["hardware"]
        assert choices["pipeline"] == "single-pass" and manifest["distributed"]["ranks"] == 2
        assert abs(choices["gptq_loss"] / one["gptq_loss"] - 1) <= 1e-3
        print(f"2 ranks vs 1: {share:.4%} codes equal, at most {worst} step(s), GPTQ loss "
              f"{choices['gptq_loss']} vs {one['gptq_loss']}")


def test_same_inputs_and_rank_count_give_bit_identical_weights(runs):
    """Every rank propagates through the weights its owner solved and broadcast, so a rerun
    merges the same numbers in the same order."""
    _, a, b = runs
    ta, tb = int8_tensors(a.path), int8_tensors(b.path)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not (ta[k] == tb[k]).all()] == []


def test_llm_compressors_two_rank_pipeline_repeats_bit_identically_and_matches_closely(
        runs, pipeline_runs):
    """Needs requant.quantization.rank_safe's barrier: without it two runs differed in every
    Linear of layer 1 (the ranks share one copy of the weights on the CPU). Against the single
    pass (another calibration order: statistics of the unquantized model) the codes stay close:
    measured 97.17 % equal, at most 2 steps, scales within 1 % of the largest on the AVX2
    hosts; on an AVX-512 (BF16) host the same code gives 90.5 %, 3 steps, 1.2 % (3 bf16
    steps), so the bounds are 85 %, 3 steps, 2 %: a sanity bound between two valid pipelines
    (their quality is compared in test_single_pass.py); the repeat is the exact claim."""
    a, b = pipeline_runs
    ta, tb = int8_tensors(a.path), int8_tensors(b.path)
    assert [k for k in ta if not (ta[k] == tb[k]).all()] == []
    assert json.loads((a.path / "manifest.json").read_text())["hardware"][
        "pipeline"] == "llm-compressor"
    share, worst = code_agreement(runs[0].path, a.path, scale_rtol=2e-2)
    assert share >= 0.85 and worst <= 3, (share, worst)


def test_solves_go_largest_first_to_the_least_loaded_rank_the_same_on_every_rank():
    from requant.quantization.ranks import Ranks, solve_cost

    # a Llama-3-8B layer's four Hessian groups: q/k/v, o, gate/up, down
    costs = [solve_cost(6144, 4096), solve_cost(4096, 4096), solve_cost(28672, 4096),
             solve_cost(4096, 14336)]
    assert [Ranks(r, 2).assign(costs) for r in (0, 1)] == [[1, 1, 1, 0]] * 2  # down alone
    assert Ranks(0, 4).assign(costs) == [2, 3, 1, 0]
    assert Ranks(0, 1).assign(costs) == [0, 0, 0, 0]
    assert Ranks(0, 3).assign([1.0, 1.0, 1.0]) == [0, 1, 2]  # ties: in order, lower rank first


MERGE_RANK = """
import sys, torch, torch.distributed as dist
from requant.errors import QuantizationFailed
from requant.quantization.hessians import ChannelRange, SharedHessians
from requant.quantization.ranks import Ranks
from requant.quantization.single_pass import merge_statistics
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
ranks = Ranks.current()
h = SharedHessians([], owner={0: 0}, sums={0: torch.full((2, 2), rank + 1.0)}, samples=rank + 1)
r = {"norm": ChannelRange(torch.tensor([-1.0 - rank, 0.0]), torch.tensor([1.0, 2.0 * rank]))}
merge_statistics(h, r, ranks, 0)
print("merged", h.sums[0].tolist(), h.samples, r["norm"].low.tolist(), r["norm"].high.tolist())
uneven = SharedHessians([], owner={i: i for i in range(rank + 1)},
                        sums={i: torch.zeros(2, 2) for i in range(rank + 1)})
try:
    merge_statistics(uneven, {}, ranks, 3)
except QuantizationFailed as exc:
    print("refused", exc)
dist.destroy_process_group()
"""


def test_ranks_merge_sums_and_ranges_and_refuse_a_layer_whose_work_differs_between_them(
        tmp_path):
    """Two real gloo processes (a file store: no port to race for) run the merge the single
    pass runs per layer: Hessians and counts add, ranges widen, and a layer with more Hessian
    groups on one rank than the other (experts routed unevenly) stops both, never half-merged."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", MERGE_RANK, str(rank),
                               str(tmp_path / "store")], cwd=root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": root})
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for out in outputs:
        assert "merged [[3.0, 3.0], [3.0, 3.0]] 3 [-2.0, 0.0] [1.0, 2.0]" in out, out
        assert "refused decoder layer 3: some Linears saw calibration tokens on some ranks " \
            "only" in out and "quantization.gpus=1" in out, out


def test_gpus_above_one_without_a_gpu_is_a_settings_error_naming_the_fix():
    with pytest.raises(SettingsError, match=r"quantization.gpus=2 but torch sees no GPU"):
        check_gpu_count(2, "auto", CPU)
    check_gpu_count(2, "cpu", CPU)  # CPU ranks asked for explicitly: allowed


def test_fewer_calibration_samples_than_ranks_is_refused_before_any_work(tiny_model, chat_file):
    from requant.preflight import run_preflight

    settings = PipelineSettings.model_validate({
        "source": {"model": str(tiny_model)},
        "calibration": {"dataset": str(chat_file), "num_samples": 2},
        "quantization": {"gpus": 4, "device": "cpu"},
        "evaluation": {"enabled": False},
    })
    with pytest.raises(SettingsError, match=r"quantization.gpus=4 needs at least 4 calibration"):
        run_preflight(settings)


def rank_pids(root: Path) -> list[int]:
    return [int(p.read_text()) for p in root.glob("**/.tmp-ranks-*/rank-*.pid")
            if p.read_text().strip()]


def test_a_rank_that_cannot_read_its_data_fails_the_stage_with_that_ranks_error(
        tiny_model, tmp_path, monkeypatch):
    """Rank 1 alone gets EACCES opening the calibration set (an audit hook in a sitecustomize on
    its PYTHONPATH: an OS-level fault, our code untouched)."""
    hook = tmp_path / "fault"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, sys
        if os.environ.get("RANK") == "1":
            DENIED = os.environ["FAULT_DENIED_DIR"]
            def deny(event, args):
                if event == "open" and str(args[0]).startswith(DENIED):
                    raise PermissionError(13, "Permission denied (planted)", str(args[0]))
            sys.addaudithook(deny)
    """))
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAULT_DENIED_DIR", str(tmp_path / "cache"))
    data = tmp_path / "chat.jsonl"
    from tests.conftest import chat_rows, write_jsonl

    write_jsonl(data, chat_rows(SAMPLES))
    out = tmp_path / "run" / "checkpoint"
    with pytest.raises(QuantizationFailed, match=r"rank 1 of 2 failed: PermissionError") as err:
        quantize(tiny_model, data, tmp_path / "cache", out, 2)
    assert err.value.rank == 1
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not [p for p in rank_pids(tmp_path) if pid_running(p)]


def test_kill_9_of_one_rank_fails_the_stage_naming_it_and_leaves_no_process(
        tiny_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    from tests.conftest import chat_rows, write_jsonl

    write_jsonl(data, chat_rows(SAMPLES))
    out = tmp_path / "run" / "checkpoint"
    killed: list[int] = []

    def kill_rank_1_once_it_calibrates() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for pid_file in tmp_path.glob("run/.tmp-ranks-*/rank-1.pid"):
                pid = int(pid_file.read_text())
                time.sleep(3)  # into model loading / calibration
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_1_once_it_calibrates, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(QuantizationFailed, match=r"rank 1 of 2 was killed by SIGKILL") as err:
        quantize(tiny_model, data, tmp_path / "cache", out, 2)
    killer.join(5)
    assert killed, "the test never found rank 1 to kill"
    assert err.value.rank == 1
    assert time.monotonic() - started < 240
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not [p for p in rank_pids(tmp_path) + killed if pid_running(p)]


def test_kill_9_of_the_stage_takes_torchrun_and_every_rank_down(tiny_model, tmp_path):
    """The Prefect worker kills a flow run's process: torchrun (parent-death signal) and then
    each rank (parent-death signal against torchrun) go with it."""
    import subprocess
    import sys

    from tests.conftest import chat_rows, processes_mentioning, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(SAMPLES))
    out = tmp_path / "run" / "checkpoint"
    stage = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_distributed_quantization import quantize;"
        "quantize(*map(Path, sys.argv[2:6]), 2)"),
        str(Path(__file__).resolve().parents[1]), str(tiny_model), str(data),
        str(tmp_path / "cache"), str(out)])
    try:
        deadline = time.monotonic() + 180
        while len(rank_pids(tmp_path)) < 2:
            assert time.monotonic() < deadline, "the ranks never started"
            assert stage.poll() is None, "the stage ended before its ranks started"
            time.sleep(0.2)
        jobs = list(tmp_path.glob("run/.tmp-ranks-*/job.json"))
        assert jobs
        alive = processes_mentioning(str(jobs[0]))  # torchrun and both ranks
        assert len(alive) >= 3
    finally:
        stage.kill()
        stage.wait(10)
    deadline = time.monotonic() + 30
    while [p for p in alive if p.is_running() and p.status() != "zombie"]:
        assert time.monotonic() < deadline, f"still running: {[p.pid for p in alive]}"
        time.sleep(0.2)
    assert not out.exists()
