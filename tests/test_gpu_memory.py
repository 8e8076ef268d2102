"""One GPU shared by quantization, evaluation's vLLM and the local serving vLLM: the shares are
budgeted at flow start, and each GPU user waits for its memory with a message naming who holds
it. The GPU cannot exist here: its free-memory reading is the one thing supplied."""

from __future__ import annotations

import pytest

from requant.errors import SettingsError
from requant.gpu_memory import (
    GIB,
    check_gpu_budget,
    quantization_need_bytes,
    wait_for_gpu_memory,
)
from requant.settings import PipelineSettings


def settings(serve: float | None = None, evaluate: float | None = None, target: str = "local"):
    local: dict = {"server": {"gpu_memory_utilization": serve}} if serve else {}
    evaluation: dict = {"server": {"gpu_memory_utilization": evaluate}} if evaluate else {}
    return PipelineSettings.model_validate({"rollout": {"target": target, "local": local},
                                            "evaluation": evaluation})


def test_the_default_shares_fit_one_gpu_with_a_blue_green_switch():
    check_gpu_budget(settings(), on_gpu=True)
    s = settings()
    assert s.rollout.local.server.gpu_memory_utilization == 0.4
    assert s.evaluation.server.gpu_memory_utilization == 0.5


def test_serving_and_evaluation_over_the_gpu_are_refused_naming_both_settings():
    with pytest.raises(SettingsError, match=r"rollout\.local\.server\.gpu_memory_utilization=0\.9"
                       r".*evaluation\.server\.gpu_memory_utilization=0\.5.*Fix: "):
        check_gpu_budget(settings(serve=0.9), on_gpu=True)


def test_two_serving_servers_of_a_switch_must_fit_too():
    with pytest.raises(SettingsError, match=r"two serving servers: 2 x 0\.6"):
        check_gpu_budget(settings(serve=0.6, evaluate=0.3), on_gpu=True)


def test_cpu_hosts_and_other_targets_have_no_gpu_budget():
    check_gpu_budget(settings(serve=0.9), on_gpu=False)
    check_gpu_budget(settings(serve=0.9, target="none"), on_gpu=True)


def test_a_gpu_user_waits_until_the_memory_is_free():
    readings = iter([(2 * GIB, 80 * GIB), (5 * GIB, 80 * GIB), (20 * GIB, 80 * GIB)])
    said, slept = [], []
    wait_for_gpu_memory(10 * GIB, "quantization", 900, said.append, lambda: next(readings),
                        slept.append)
    assert len(slept) == 2 and len(said) == 1  # said once, not every 5 s
    assert "quantization needs 10.0 GiB of GPU memory; 2.0 of 80.0 GiB are free" in said[0]
    assert "rollout.local.server.gpu_memory_utilization" in said[0]


def test_a_gpu_user_that_never_gets_its_memory_fails_with_the_fix():
    with pytest.raises(SettingsError, match=r"waited 0 s\. Fix: rollout\.local\.server"):
        wait_for_gpu_memory(10 * GIB, "vLLM for m", 0, lambda _m: None,
                            lambda: (1 * GIB, 80 * GIB), lambda _s: None)


def test_no_gpu_reading_means_nothing_to_wait_for():
    wait_for_gpu_memory(10 * GIB, "quantization", 0, lambda _m: None, lambda: None)


def test_quantization_needs_a_layer_its_hessians_and_a_batch_not_the_model():
    from transformers import LlamaConfig

    eight_b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
    need = quantization_need_bytes(eight_b, 16384)
    assert 3 * GIB < need < 8 * GIB  # measured peak with the cache on the GPU: 11.6 GiB
