"""Tiny random-weight causal LMs built from each supported architecture's real config class: the
modelling code, norms and module names are transformers' own, only the sizes are small. Norm
weights are moved away from their initial values, so a smoothing that mishandles a norm shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: model_type -> (config class, model class) in transformers.
ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


#: Shapes vLLM's CPU attention kernels accept (head_dim 64), for the tests that serve the model.
SERVABLE = {"hidden": 256, "head_dim": 64, "intermediate": 512}


def tiny_config(model_type: str, vocab_size: int, layers: int = 2, hidden: int = 64,
                head_dim: int = 16, intermediate: int = 128, **tokens: Any) -> Any:
    import transformers

    config_cls = getattr(transformers, ARCHS[model_type][0])
    return config_cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=head_dim, max_position_embeddings=2048,
        tie_word_embeddings=model_type.startswith("gemma"),  # as every real Gemma: no lm_head
        **tokens)


def build_tiny_model(path: Path, model_type: str, tokenizer: Any | None = None, *,
                     vocab_size: int = 384, layers: int = 2, dtype: str = "bfloat16",
                     seed: int = 0, **shape: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    tokens = {} if tokenizer is None else {
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(model_type, **({"vocab_size": vocab_size} | tokens), layers=layers,
                         **shape)
    model = getattr(transformers, ARCHS[model_type][1])(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # away from 1 (plain) or 0 (offset norms): both forms visible
                param.add_(0.3 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
