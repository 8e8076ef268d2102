"""Calibration-data prep: draw, render, tokenize and cache the samples oneshot calibrates on.

Samples are truncated to ``max_seq_len`` but not padded: a padded token costs as much compute as a
real one and, unless every hook masks it, pollutes SmoothQuant's and GPTQ's statistics
(docs/calibration.md has the measurement). Chat rows go through the model's own chat template,
because the quantized model will be served with it and should be calibrated on what it will see.

The prepared set is cached under a key of everything that determines it (dataset bytes, tokenizer
files, parameters), so a nightly rerun with unchanged inputs reuses it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from requant.atomic import atomic_directory, write_json_atomic
from requant.errors import SettingsError
from requant.hashing import fingerprint, sha256_file
from requant.settings import CalibrationSettings
from requant.source import ResolvedSource

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CACHE_FORMAT_VERSION = 1  # bump when the prepared set's layout or tokenization changes


@dataclass(frozen=True)
class TokenStats:
    samples: int
    total_tokens: int
    min_len: int
    p50_len: int
    p90_len: int
    p99_len: int
    max_len: int
    truncated: int  # samples cut at max_seq_len
    skipped_empty: int  # drawn rows whose text was empty (they carry no signal)
    padding_tokens: int  # tokens added by pad_to_max_length (0 by default)


@dataclass(frozen=True)
class CalibrationSet:
    path: Path  # a datasets.save_to_disk directory with input_ids + attention_mask
    fingerprint: str
    stats: TokenStats
    row_format: str  # "chat" or "text"
    reused: bool

    def as_record(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "row_format": self.row_format,
            "stats": asdict(self.stats),
        }


# ---------------------------------------------------------------------------------------------
# Plain functions (tested directly)
# ---------------------------------------------------------------------------------------------


def load_rows(cfg: CalibrationSettings):
    """Load the raw rows, failing with the field to fix when the source does not exist."""
    import datasets

    path = Path(cfg.dataset).expanduser()
    if path.suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise SettingsError(
                f"calibration.dataset: file {path} not found. Give an existing .json, .jsonl or "
                ".parquet file, or a Hub dataset id."
            )
        if path.suffix not in LOCAL_FORMATS:
            raise SettingsError(
                f"calibration.dataset: {path.name} has an unsupported extension. Use .json, "
                ".jsonl or .parquet."
            )
        if path.stat().st_size == 0:
            raise SettingsError(
                f"calibration.dataset: {path} is empty. Give a file with one row per sample "
                f"(a '{cfg.messages_column}' column of chat turns or a '{cfg.text_column}' "
                "column of text)."
            )
        try:
            return datasets.load_dataset(
                LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"
            )
        except Exception as exc:
            reason = str(exc).strip() or type(exc).__name__
            raise SettingsError(
                f"calibration.dataset: cannot read {path} as {LOCAL_FORMATS[path.suffix]} "
                f"({reason}). Check the file's format: one JSON object per line for .jsonl."
            ) from exc
    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except ValueError as exc:  # unknown split / config
        raise SettingsError(
            f"calibration.split/subset: {cfg.dataset} has no split {cfg.split!r} "
            f"(subset {cfg.subset!r}): {exc}"
        ) from exc
    except Exception as exc:
        raise SettingsError(
            f"calibration.dataset: cannot load Hub dataset {cfg.dataset!r} "
            f"({type(exc).__name__}: {exc}). Check the id (and that the Hub is reachable), or "
            "use a local file."
        ) from exc


def dataset_fingerprint(cfg: CalibrationSettings, rows) -> str:
    path = Path(cfg.dataset).expanduser()
    if path.is_file():
        return sha256_file(path)
    # Hub datasets: datasets' own fingerprint hashes the cached arrow files of this revision.
    return fingerprint({"id": cfg.dataset, "subset": cfg.subset, "split": cfg.split,
                        "datasets_fp": rows._fingerprint})


def row_format(cfg: CalibrationSettings, column_names: list[str], tokenizer) -> str:
    """"chat" or "text", or a SettingsError saying which column or template is missing."""
    if cfg.messages_column in column_names:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingsError(
                f"calibration.messages_column: the dataset has chat rows ({cfg.messages_column!r}) "
                "but the source model's tokenizer has no chat template. Use a text column "
                "(calibration.text_column) or a model with a chat template."
            )
        return "chat"
    if cfg.text_column in column_names:
        return "text"
    raise SettingsError(
        f"calibration.text_column: the dataset has neither a {cfg.messages_column!r} column "
        f"(chat rows) nor a {cfg.text_column!r} column (text). Its columns are {column_names}; "
        "set calibration.text_column or calibration.messages_column to one of them."
    )


def check_sample_count(cfg: CalibrationSettings, available: int) -> None:
    if cfg.num_samples > available:
        raise SettingsError(
            f"calibration.num_samples: {cfg.num_samples} asked for, but {cfg.dataset} has only "
            f"{available} rows. Set calibration.num_samples to at most {available}, or use a "
            "larger dataset."
        )


def tokenize_rows(
    rows, cfg: CalibrationSettings, fmt: str, tokenizer
) -> tuple[list[list[int]], int, int]:
    """Token ids per sample, truncated to max_seq_len; returns (ids, truncated, skipped empty).

    A chat template already writes the model's special tokens (Llama 3's begins with
    <|begin_of_text|>), so chat text is tokenized without adding them again; plain text gets the
    tokenizer's usual BOS.
    """
    ids: list[list[int]] = []
    truncated = skipped = 0
    for row in rows:
        if fmt == "chat":
            messages = row[cfg.messages_column] or []
            if not any(str(m.get("content") or "").strip() for m in messages):
                skipped += 1
                continue
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = str(row[cfg.text_column] or "")
            if not text.strip():
                skipped += 1
                continue
            enc = tokenizer(text)["input_ids"]
        if len(enc) > cfg.max_seq_len:
            truncated += 1
            enc = enc[: cfg.max_seq_len]
        ids.append(list(enc))
    return ids, truncated, skipped


def token_stats(
    lengths: list[int], truncated: int, skipped_empty: int = 0, padding_tokens: int = 0
) -> TokenStats:
    import numpy as np

    if not lengths:
        raise SettingsError(
            "calibration.dataset: every drawn sample is empty, so there is nothing to calibrate "
            "on. Check calibration.text_column / calibration.messages_column."
        )
    arr = np.asarray(lengths)
    pct = lambda q: int(np.percentile(arr, q, method="nearest"))  # noqa: E731
    return TokenStats(
        samples=len(lengths), total_tokens=int(arr.sum()), min_len=int(arr.min()),
        p50_len=pct(50), p90_len=pct(90), p99_len=pct(99), max_len=int(arr.max()),
        truncated=truncated, skipped_empty=skipped_empty, padding_tokens=padding_tokens,
    )


def build_calibration_set(
    cfg: CalibrationSettings, source: ResolvedSource, cache_dir: Path
) -> CalibrationSet:
    """Validate, draw, tokenize and cache; everything before a model's weights are touched."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    fmt = row_format(cfg, list(rows.column_names), tokenizer)
    check_sample_count(cfg, len(rows))

    tokenizer_files = {k: v for k, v in source.files.items() if "token" in k or k.endswith(
        (".jinja", ".model", "merges.txt", "vocab.txt"))}
    key = fingerprint({
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset_fingerprint(cfg, rows),
        "tokenizer": tokenizer_files,
        "params": cfg.model_dump(exclude={"dataset"}),
    })
    target = Path(cache_dir) / "calibration" / key
    stats_file = target / "stats.json"
    if stats_file.is_file():
        stats = TokenStats(**json.loads(stats_file.read_text())["stats"])
        return CalibrationSet(target, key, stats, fmt, reused=True)

    drawn = rows.shuffle(seed=cfg.seed).select(range(cfg.num_samples))
    ids, truncated, skipped = tokenize_rows(drawn, cfg, fmt, tokenizer)
    lengths = [len(x) for x in ids]
    padding = 0
    if cfg.pad_to_max_length:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)
        padding = sum(cfg.max_seq_len - n for n in lengths)
        masks = [[1] * n + [0] * (cfg.max_seq_len - n) for n in lengths]
        ids = [x + [pad_id] * (cfg.max_seq_len - len(x)) for x in ids]
    else:
        masks = [[1] * n for n in lengths]
    stats = token_stats(lengths, truncated, skipped, padding)
    with atomic_directory(target) as tmp:
        Dataset.from_dict({"input_ids": ids, "attention_mask": masks}).save_to_disk(
            str(tmp / "data")
        )
        write_json_atomic(tmp / "stats.json", {"stats": asdict(stats), "format": fmt,
                                                 "settings": cfg.model_dump()})
    return CalibrationSet(target, key, stats, fmt, reused=False)


def load_prepared(calib: CalibrationSet):
    from datasets import load_from_disk

    return load_from_disk(str(calib.path / "data"))
