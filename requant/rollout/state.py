"""The deployed state of a rollout target: what serves now, since when, by which run, what
served before, which revisions an operator rolled back from, and whether the Hub's production
marker has caught up. One JSON file per target, written atomically, and the one record that the
rollout, ``requant status``, rollback and the nightly run's "already serving?" check all read:
no second record of what serves exists to disagree with it.

The Hub's production marker follows this record, never the other way round: a revision is
recorded serving with ``marker="pending"`` in the same write that makes it active, and
``"moved"`` only after the marker moved. A failed (or killed) marker move therefore leaves a
record that says so, ``requant status`` shows it, and the next promote or nightly run of that
revision moves the marker (the rollout itself is then a no-op).

Kubernetes keeps the same record as annotations on its Deployment as well (read back by
``record_from_cluster`` when a run died after verifying); this file is the local target's
source of truth and the Kubernetes target's audit copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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

    def identities(self) -> tuple[str, ...]:
        """What a ledger record may name this release by: a Hub commit by its SHA (the folder
        it was fetched to is a cache), a local checkpoint by its revision and its folder."""
        if self.repo_id or not self.checkpoint:
            return (self.revision,)
        return (self.revision, str(Path(self.checkpoint).resolve()))


@dataclass(frozen=True)
class Intent:
    """Why a release is rolled out, recorded with it: a rollback withdraws what it replaces (the
    nightly run never pushes it again); ``forced`` went past a missing or failed gate."""

    rollback: bool = False
    forced: bool = False


@dataclass
class Deployed:
    release: Release
    deployed_at: str
    flow_run_id: str | None
    endpoint: str | None = None
    server: dict[str, Any] = field(default_factory=dict)  # local: pid, port, url, log
    verification: dict[str, Any] = field(default_factory=dict)
    rollback: bool = False
    forced: bool = False
    #: The Hub's production marker: "pending" until it points here, then "moved"; None for a
    #: release with no Hub repository (a local checkpoint).
    marker: str | None = None

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
    #: Revisions (and folders) an operator rolled back from: not rolled out again until promoted
    #: explicitly.
    withdrawn: list[str] = field(default_factory=list)

    def activate(self, deployed: Deployed) -> None:
        """``deployed`` serves now. One write of the caller's records it with everything that
        follows from it (previous, withdrawn, the marker still to move), so no kill between two
        records can leave them disagreeing."""
        left, ids = self.active, deployed.release.identities()
        withdrawn = [w for w in self.withdrawn if w not in ids]
        if deployed.rollback and left is not None:
            withdrawn += [i for i in left.release.identities()
                          if i not in withdrawn and i not in ids]
        deployed.marker = "pending" if deployed.release.repo_id else None
        self.previous, self.active, self.pending, self.withdrawn = left, deployed, None, withdrawn

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    def record_event(self, event: str, release: Release, flow_run_id: str | None, at: str,
                     reason: str | None = None) -> None:
        self.history.append({"event": event, "release": asdict(release), "at": at,
                             "flow_run_id": flow_run_id, "reason": reason})
        del self.history[:-HISTORY_KEPT]


def now_iso() -> str:
    """When something happened, as every deployed-state record and annotation writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        withdrawn=rec.get("withdrawn", []),
    )


def save_state(state_dir: Path, state: DeployState) -> Path:
    path = state_path(state_dir, state.target)
    write_json_atomic(path, state.as_record())
    return path


def record_marker_moved(state_dir: Path, target: str, revision: str) -> bool:
    """The production marker now points at ``revision``: the record says so, if that revision
    still serves (a later rollout may have replaced it meanwhile; then nothing changes)."""
    state = load_state(state_dir, target)
    if state.active is None or state.active.release.revision != revision:
        return False
    if state.active.marker != "moved":
        state.active.marker = "moved"
        save_state(state_dir, state)
    return True
