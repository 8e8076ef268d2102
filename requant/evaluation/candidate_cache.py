"""A candidate's answers, kept by what the candidate is: the bytes a model server reads.

The key is the served files' sha256 (weights, ``config.json`` with its ``quantization_config``,
tokenizer and chat template; not requant's manifest, which names the run that wrote it) and
everything that changes an answer (``evaluated_with``: the tasks and their files, the server's
settings, vLLM's and lm-eval's versions, the hardware, the looks and the question order), the
same evidence the baseline's cache is keyed by. The same bytes quantized again (a search that
repeats the nightly's candidate; a run again after its publish failed) are not asked the same
questions a second time.

The gate still decides look by look: a kept record of more stages than the decision has reached
is cut to that look's questions (the stage plan is a function of the task sizes, the looks and
the seed), so every decision is the one the answers gave live. What is reused is said: the
candidate's record says ``cached`` and its folder holds ``cache.json`` (key and origin).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from requant.atomic import atomic_directory, write_json_atomic
from requant.evaluation.lmeval import (
    ModelEvaluation,
    evaluated_with,
    load_record,
    save_record,
)
from requant.evaluation.task_files import effective_looks, stage_plan
from requant.hashing import fingerprint, hash_files
from requant.quantization.manifest import MANIFEST_NAME
from requant.settings import EvaluationSettings, GateSettings
from requant.source import model_file_names

CACHE_DIR = "candidate-eval"
#: After each stage: (the record so far, stage index, stages) -> is the decision final?
StopRule = Callable[[ModelEvaluation, int, int], bool]
MARK = "cache.json"


def served_files(checkpoint: Path) -> dict[str, str]:
    """sha256 of every file a model server reads from ``checkpoint`` (a source's files)."""
    return hash_files(checkpoint, [name for name in model_file_names(checkpoint, True)
                                   if name != MANIFEST_NAME])


def candidate_cache_key(checkpoint: Path, cfg: EvaluationSettings, gate: GateSettings,
                        on_gpu: bool) -> str:
    return fingerprint({"served_files": served_files(checkpoint),
                        "evaluated_with": evaluated_with(cfg, gate, on_gpu)})


class CandidateCache:
    """One candidate's kept answers under ``cache_dir/candidate-eval/<key>``."""

    def __init__(self, cache_dir: Path, checkpoint: Path, cfg: EvaluationSettings,
                 gate: GateSettings, on_gpu: bool) -> None:
        self.key = candidate_cache_key(checkpoint, cfg, gate, on_gpu)
        self.folder = Path(cache_dir) / CACHE_DIR / self.key
        self.looks = effective_looks(cfg, gate)
        self.seed = gate.order_seed

    def kept(self) -> ModelEvaluation | None:
        if not (self.folder / "summary.json").is_file():
            return None
        return load_record("candidate", self.folder, cached=True)

    def replay(self, have: ModelEvaluation, first: int, upto: int, stop: StopRule,
               out_dir: Path) -> ModelEvaluation | None:
        """Stages ``first``..``upto``-1 from ``have``, one look at a time, until ``stop`` says
        the decision is final; written to ``out_dir`` as far as they went. None when ``have``
        holds none of them."""
        last = min(have.stages, upto)
        if first >= last:
            return None
        reached = first
        for k in range(first, last):
            reached = k + 1
            if stop(self.cut(have, reached), k, len(self.looks)):
                break
        return self.write(have, reached, out_dir)

    def cut(self, have: ModelEvaluation, stages: int) -> ModelEvaluation:
        """``have`` as it stood after ``stages`` stages: only those stages' questions."""
        asked: dict[str, set[int]] = {}
        for stage in stage_plan(have.totals, self.looks, self.seed)[:stages]:
            for task, questions in stage.items():
                asked.setdefault(task, set()).update(questions)

        def of(key: str) -> set[int]:
            return asked.get(key.split("|", 1)[0], set())

        return replace(
            have, stages=stages,
            per_doc={k: {d: s for d, s in v.items() if d in of(k)}
                     for k, v in have.per_doc.items()},
            prompts={t: {d: h for d, h in v.items() if d in asked.get(t, set())}
                     for t, v in have.prompts.items()})

    def write(self, have: ModelEvaluation, stages: int, out_dir: Path) -> ModelEvaluation:
        """The cut record as a result folder: lm-eval's per-stage results and samples of those
        stages, the scores, and where they came from."""
        cut = replace(self.cut(have, stages), result_dir=out_dir, cached=True)
        with atomic_directory(out_dir) as tmp:
            for path in self.folder.iterdir():
                if path.name.startswith("samples_") and path.suffix == ".jsonl":
                    rows = [line for line in path.read_text().splitlines()
                            if json.loads(line).get("requant_stage", 1) <= stages]
                    (tmp / path.name).write_text("".join(f"{r}\n" for r in rows))
                elif (path.name.startswith("results_") and path.suffix == ".json"
                      and _stage_of(path.name) <= stages):
                    shutil.copy2(path, tmp / path.name)
            save_record(tmp, cut)
            write_json_atomic(tmp / MARK, {"key": self.key, "from": str(self.folder),
                                           "stages": stages, "kept_stages": have.stages})
        return cut

    def keep(self, result: ModelEvaluation) -> None:
        """Keep ``result`` when it answered more stages than the kept record."""
        have = self.kept()
        if have is not None and have.stages >= result.stages:
            return
        with atomic_directory(self.folder) as tmp:
            shutil.copytree(result.result_dir, tmp, dirs_exist_ok=True)
            (tmp / MARK).unlink(missing_ok=True)
            save_record(tmp, replace(result, result_dir=self.folder, cached=False))


def _stage_of(name: str) -> int:
    """``results_<task>_stage<k>.json`` -> k (1 for a file without a stage)."""
    stem = name.removesuffix(".json")
    head, _, tail = stem.rpartition("_stage")
    return int(tail) if head and tail.isdigit() else 1

