"""Is a local model folder complete? Checked in preflight, before anything expensive.

A folder with only ``config.json``, a truncated shard or a missing tokenizer otherwise fails
deep inside transformers or safetensors (``incomplete metadata``, a tokenizer backend's
``ValueError``) after the calibration set was built. Reading each safetensors header (8 bytes of
length, then JSON) and comparing the file's size with the offsets it declares finds truncation
without loading a single tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from requant.errors import SettingsError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "tokenizer.tiktoken")
INDEX = "model.safetensors.index.json"


def check_model_folder(root: Path, field: str = "source.model") -> None:
    problems = json_problems(root) + tokenizer_problems(root) + weight_problems(root)
    if problems:
        raise SettingsError(
            f"{field}: {root} is not a complete Hugging Face model folder:\n    - "
            + "\n    - ".join(problems)
            + "\n  Copy the whole folder that save_pretrained (or a Hub download) wrote: "
            "config.json, the tokenizer files and every weight shard."
        )


#: JSON files transformers reads from a model folder; each must parse as an object.
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json")


def json_problems(root: Path) -> list[str]:
    """Broken JSON found now, naming the file, instead of a library's traceback later."""
    problems = []
    for name in JSON_FILES:
        if not (root / name).is_file():
            continue
        try:
            doc = json.loads((root / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{name} is not valid JSON ({str(exc)[:80]})")
            continue
        if not isinstance(doc, dict):
            problems.append(f"{name} is not a JSON object")
        elif name == "config.json" and not isinstance(doc.get("model_type"), str):
            problems.append("config.json names no model_type")
    return problems


def tokenizer_problems(root: Path) -> list[str]:
    if any((root / name).is_file() for name in TOKENIZER_FILES):
        return []
    return [f"no tokenizer (none of {', '.join(TOKENIZER_FILES)})"]


def weight_problems(root: Path) -> list[str]:
    shards = sorted(root.glob("*.safetensors"))
    index = root / INDEX
    problems: list[str] = []
    if index.is_file():
        try:
            wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            return [f"{INDEX} is unreadable ({exc})"]
        problems += [f"{name} is listed in {INDEX} but missing" for name in wanted
                     if not (root / name).is_file()]
    if not shards and not problems:
        if any(root.glob("*.bin")):
            return ["weights are only in PyTorch .bin files; requant reads safetensors "
                    "(convert with save_pretrained(..., safe_serialization=True))"]
        return ["no weights (*.safetensors)"]
    return problems + [p for shard in shards if (p := shard_problem(shard))]


def shard_problem(path: Path) -> str | None:
    """None when the header parses and the file is exactly as long as it declares."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes, no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{path.name} is truncated (header of {length} bytes, file of {size})"
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
              default=0)
    if size != 8 + length + end:
        return (f"{path.name} is truncated or padded: {size} bytes, its header declares "
                f"{8 + length + end}")
    return None
