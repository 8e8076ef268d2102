"""The model read once on N ranks (#24 §2): the skeleton a non-zero rank builds must be the
model rank 0 loads, tensor for tensor, or the broadcasts would pair the wrong tensors. The
whole path (two gloo ranks, rank 1 holding no weights, bit-identical reruns) is in
test_distributed_quantization.py."""

from __future__ import annotations

import pytest
import torch

from requant.quantization.oneshot import load_model
from requant.quantization.weights_home import (
    WeightsHome,
    model_signature,
    model_skeleton,
    module_tensors,
)
from tests.tinymodels import ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
@pytest.mark.parametrize("compute", [None, torch.float32])
def test_a_skeleton_has_the_loaded_models_tensors_by_name_shape_and_dtype_and_no_memory(
        model_type, compute, tokenizer, tmp_path):
    folder = build_tiny_model(tmp_path / model_type, model_type, tokenizer)
    loaded, _ = load_model(folder, dtype=compute or "auto")
    skeleton = model_skeleton(folder, False, compute)
    assert model_signature(skeleton) == model_signature(loaded)
    assert all(p.is_meta for p in skeleton.parameters())
    # tied weights (Gemma) counted once per name on both sides: the broadcast lists pair up
    assert len(module_tensors(skeleton)) == len(module_tensors(loaded))


def test_a_skeleton_with_another_dtype_has_another_signature(tokenizer, tmp_path):
    """What check_same_model refuses (one clear error, before any broadcast)."""
    folder = build_tiny_model(tmp_path / "llama", "llama", tokenizer)
    assert model_signature(model_skeleton(folder, False, torch.float32)) != model_signature(
        model_skeleton(folder, False, torch.bfloat16))


def test_one_rank_keeps_its_weights_on_the_host_and_shares_nothing(tokenizer, tmp_path):
    folder = build_tiny_model(tmp_path / "llama", "llama", tokenizer)
    model, _ = load_model(folder)
    home = WeightsHome()
    layer = model.model.layers[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    home.check_same_model(model)
    home.to_device(layer)
    home.share(layer)
    home.to_host(layer)
    assert home.holds_weights
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
