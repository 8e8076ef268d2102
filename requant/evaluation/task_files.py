"""lm-eval task files: which tasks exist, where their local data is, how many questions each
has, and the fixed, seeded order the gate's stages walk through them."""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from requant.errors import SettingsError
from requant.evaluation.sequential import look_sizes, question_order
from requant.hashing import hash_files, sha256_file
from requant.serving.server import serving_python
from requant.settings import EvaluationSettings, GateSettings

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def task_dir(cfg: EvaluationSettings) -> Path | None:
    if cfg.task_dir is None:
        return None
    path = Path(cfg.task_dir)
    return path if path.is_absolute() else (Path.cwd() / path)


def resolved_data_files(path: Path, doc: dict[str, Any]) -> dict[str, str] | str | None:
    """A task YAML's ``data_files`` made absolute: they are written relative to the YAML itself,
    so the project can move."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        return {split: str((path.parent / f).resolve()) for split, f in files.items()}
    if isinstance(files, str):
        return str((path.parent / files).resolve())
    return None


def render_task_dir(src: Path, dst: Path) -> Path:
    """Copy task YAMLs with absolute ``data_files``, so lm-eval reads them from any cwd."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if (files := resolved_data_files(path, doc)) is not None:
            doc["dataset_kwargs"]["data_files"] = files
        (dst / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def task_data_hashes(src: Path | None) -> dict[str, str]:
    """Hashes of the task YAMLs and the local data they read: part of the baseline cache key."""
    if src is None or not src.is_dir():
        return {}
    hashes = hash_files(src, [p.name for p in sorted(src.glob("*.yaml"))])
    for path in sorted(src.glob("*.yaml")):
        files = resolved_data_files(path, yaml.safe_load(path.read_text()))
        for f in (files.values() if isinstance(files, dict) else [files] if files else []):
            if Path(f).is_file():
                hashes[f"data:{Path(f).name}"] = sha256_file(Path(f))
    return hashes


def task_manager(include_path: Path | None, names: Iterable[str]) -> TaskManager:
    """lm-eval's index of task YAMLs. Indexing its thousands of built-in tasks takes ~15 s on
    2 cores, every time (each stage and task asks again); when ``include_path`` holds every task
    named, as the bundled ones do, only that folder is indexed. The YAMLs, and so the prompts,
    are the same either way."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


class _Function(str):
    """A ``!function module.name`` in a task YAML: the Python lm-eval would import."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(
    loader.construct_scalar(node)))


def check_task_files(src: Path, roots: list[Path]) -> None:
    """Every file a task YAML under ``src`` reaches (``include:``, ``!function`` modules,
    ``data_files``) lies under ``roots``; refused, naming the YAML, before lm-eval reads any."""
    allowed = [Path(r).resolve() for r in roots]
    seen: set[Path] = set()
    todo = sorted(src.rglob("*.yaml"))
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for what, target in _reached(path):
            if not any(target.is_relative_to(root) for root in allowed):
                raise SettingsError(
                    f"evaluation.task_dir: {path.name} reaches {what} {target}, outside the "
                    f"task folders ({', '.join(map(str, allowed))}). The worker's operator "
                    "keeps every file a task reads in the task folder or evaluation.data_roots.")
            if what == "include" and target.suffix == ".yaml":
                todo.append(target)


def _reached(path: Path) -> list[tuple[str, Path]]:
    try:
        doc = yaml.load(path.read_text(), Loader=_TaskLoader) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"evaluation.task_dir: {path} is not a readable task YAML "
                            f"({str(exc).splitlines()[0][:120]}).") from None
    found: list[tuple[str, Path]] = []
    if isinstance(doc, dict) and isinstance(doc.get("include"), str):
        found.append(("include", (path.parent / doc["include"]).resolve()))
    for value in _values(doc):
        if isinstance(value, _Function):
            module = ".".join(value.split(".")[:-1]).replace(".", "/")
            found.append(("!function", (path.parent / f"{module}.py").resolve()))
    files = resolved_data_files(path, doc) if isinstance(doc, dict) else None
    for f in (files.values() if isinstance(files, dict) else [files] if files else []):
        found.append(("data_files", Path(f).resolve()))
    return found


def _values(node: Any) -> Iterable[Any]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    else:
        yield node


def task_roots(cfg: EvaluationSettings, src: Path) -> list[Path]:
    """Where the files of a task folder may lie: the folder and the operator's
    evaluation.data_roots (by default the project's data/)."""
    return [src, *cfg.data_roots]


def validate_tasks(cfg: EvaluationSettings) -> None:
    """Unknown task names fail now, with the closest real names, before any server starts;
    a task folder's files are checked to stay inside it first (``check_task_files``)."""
    src = task_dir(cfg)
    if src is not None and not src.is_dir():
        raise SettingsError(
            f"evaluation.task_dir: {src} is not a directory. Point it at lm-eval task YAMLs "
            "or set it to null."
        )
    if src is not None:
        check_task_files(src, task_roots(cfg, src))
    known = set(task_manager(src, [*cfg.tasks, *cfg.task_limits, *cfg.task_fewshot]).all_tasks)
    for name in cfg.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SettingsError(f"evaluation.tasks: lm-eval has no task {name!r}.{hint}")
    for name in (*cfg.task_limits, *cfg.task_fewshot):  # an override for a task not run is
        if name not in known:                            # harmless; a misspelt one is not
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SettingsError(f"evaluation.task_limits / task_fewshot: lm-eval has no task "
                                f"{name!r}.{hint}")
    if cfg.backend == "vllm":
        check = subprocess.run(
            [str(serving_python(cfg.server)), "-c", "import lm_eval, vllm"],
            capture_output=True, text=True, check=False,
        )
        if check.returncode != 0:
            raise SettingsError(
                "evaluation.backend: 'vllm' runs lm-eval inside the serving environment, which "
                f"lacks lm_eval or vllm ({check.stderr.strip().splitlines()[-1:]}). Use "
                "backend=server, or install lm-eval there."
            )


def task_limit(cfg: EvaluationSettings, name: str) -> int | None:
    return cfg.task_limits.get(name, cfg.limit)


def task_fewshot(cfg: EvaluationSettings, name: str) -> int:
    return cfg.task_fewshot.get(name, cfg.num_fewshot)


def task_sizes(cfg: EvaluationSettings, include_path: Path | None) -> dict[str, int]:
    """Questions per task after its limit (lm-eval's own count of the evaluation split)."""
    from lm_eval.tasks import get_task_dict

    loaded = get_task_dict(list(cfg.tasks), task_manager(include_path, cfg.tasks))
    sizes = {}
    for name in cfg.tasks:
        n = len(loaded[name].eval_docs)
        limit = task_limit(cfg, name)
        sizes[name] = min(n, limit) if limit else n
    return sizes


def stage_plan(sizes: dict[str, int], looks: list[float], seed: int
               ) -> list[dict[str, list[int]]]:
    """Per stage, the questions of each task it adds: the seeded order cut at the looks.
    Each chunk is sorted: lm-eval maps logged doc ids through the list it was given in its own
    (ascending) order, and the few-shot draws depend on a chunk's content, not its order."""
    plan: list[dict[str, list[int]]] = [{} for _ in looks]
    for name, total in sizes.items():
        order = question_order(list(range(total)), seed)
        cuts = look_sizes(total, tuple(looks))
        cuts = cuts + [total] * (len(looks) - len(cuts))
        start = 0
        for k, end in enumerate(cuts):
            plan[k][name] = sorted(order[start:end])
            start = end
    return plan


def effective_looks(cfg: EvaluationSettings, gate: GateSettings) -> list[float]:
    """The in-process vllm backend evaluates in one go (a stage would reload the model)."""
    return [1.0] if cfg.backend == "vllm" else list(gate.looks)
