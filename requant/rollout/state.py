"""The deployed state of a rollout target: what serves now, since when, by which run, and what
served before. One JSON file per target, written atomically, read by the next rollout (to drain
and stop the old server, and to know what "roll back" means) and by a person (`cat` it).

Kubernetes keeps the same record as annotations on its Deployment as well; this file is the
local target's source of truth and the Kubernetes target's audit copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from requant.atomic import read_json, write_json_atomic

HISTORY_KEPT = 20


@dataclass(frozen=True)
class Release:
    """What is being deployed: a published Hub commit, or a local checkpoint (dry-run demo)."""

    revision: str  # the Hub commit SHA, or "local-<content digest>" for a local checkpoint
    repo_id: str | None = None
    checkpoint: str | None = None  # local directory served (Hub snapshots are fetched to one)

    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else self.revision


@dataclass
class Deployed:
    release: Release
    deployed_at: str
    flow_run_id: str | None
    endpoint: str | None = None
    server: dict[str, Any] = field(default_factory=dict)  # local: pid, port, url, log
    verification: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Deployed:
        return cls(**(rec | {"release": Release(**rec["release"])}))


@dataclass
class DeployState:
    target: str
    active: Deployed | None = None
    previous: Deployed | None = None
    pending: Deployed | None = None  # a rollout in progress (or one that crashed: reaped next)
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    def record_event(self, event: str, release: Release, flow_run_id: str | None, at: str,
                     reason: str | None = None) -> None:
        self.history.append({"event": event, "release": asdict(release), "at": at,
                             "flow_run_id": flow_run_id, "reason": reason})
        del self.history[:-HISTORY_KEPT]


def state_path(state_dir: Path, target: str) -> Path:
    return Path(state_dir) / target / "state.json"


def load_state(state_dir: Path, target: str) -> DeployState:
    path = state_path(state_dir, target)
    rec = read_json(path, "It records what serves on this target: restore it from a backup, or "
                    "delete it and promote the revision that should serve.")
    if rec is None:
        return DeployState(target)
    return DeployState(
        target=rec["target"],
        active=Deployed.from_record(rec["active"]) if rec.get("active") else None,
        previous=Deployed.from_record(rec["previous"]) if rec.get("previous") else None,
        pending=Deployed.from_record(rec["pending"]) if rec.get("pending") else None,
        history=rec.get("history", []),
    )


def save_state(state_dir: Path, state: DeployState) -> Path:
    path = state_path(state_dir, state.target)
    write_json_atomic(path, state.as_record())
    return path
