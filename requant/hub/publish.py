"""Publish: one Hub commit holding the whole candidate, then an immutable tag that pins it.

- Never partial: weights, tokenizer, recipe, manifest, lm-eval results, gate decision and model
  card go up in a single commit. LFS objects are uploaded first, content-addressed; if anything
  fails before the commit, the repo's branches are untouched, and a retry re-sends only the
  objects the Hub does not have yet.
- Idempotent and safe under concurrency (requant.hub.commits): the tag ends in a digest of the
  model's own files and the commit carries the digest in a trailer; a publish that finds either
  commits nothing, and the commit is made with ``parent_commit`` so two publishes of the same
  candidate at once make one commit. A kill -9 between commit and tag is finished by the re-run.
- The card's metadata is checked offline and by the Hub's validation before any upload.
- Downstream pins the returned commit SHA, never a branch.
- The token comes from $HF_TOKEN or a Prefect Secret block, is resolved inside the task (never a
  parameter, so never recorded by Prefect), and is never logged or written anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from requant.atomic import atomic_directory, write_json_atomic
from requant.hashing import fingerprint, sha256_file
from requant.hub.cardcheck import check_card_locally, check_card_on_hub
from requant.hub.client import endpoint, hub_api, hub_errors
from requant.hub.commits import commit_once, ensure_tag
from requant.hub.modelcard import render_card
from requant.hub.secrets_check import refuse_secrets, worker_secrets
from requant.settings import HubSettings

#: Files that carry the run's story rather than the model; they do not change its identity.
NON_MODEL_FILES = {"manifest.json", "README.md"}


@dataclass(frozen=True)
class PublishResult:
    dry_run: bool
    repo_id: str | None
    commit_sha: str | None
    tag: str | None
    url: str | None
    no_op: bool
    content_digest: str
    files: list[dict[str, Any]] = field(default_factory=list)
    folder: str = ""

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Plain functions
# ---------------------------------------------------------------------------------------------


def collect_files(checkpoint: Path, eval_dir: Path | None, gate_dir: Path | None
                  ) -> list[tuple[str, Path]]:
    """(path in repo, local path) for everything a candidate commit holds, card excluded."""
    files = [(p.relative_to(checkpoint).as_posix(), p) for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and not p.name.startswith(".")]
    for label in ("baseline", "candidate"):
        base = eval_dir / label if eval_dir else None
        if base and base.is_dir():
            for name in ("summary.json", "per_doc.json"):
                if (base / name).is_file():
                    files.append((f"eval/{label}/{name}", base / name))
            files += [(f"eval/{label}/{p.name}", p) for pattern in ("results_*.json",
                      "samples_*.jsonl") for p in sorted(base.glob(pattern))]
    if gate_dir and (gate_dir / "decision.json").is_file():
        files.append(("eval/gate-decision.json", gate_dir / "decision.json"))
    return files


def content_digest(files: list[tuple[str, Path]]) -> str:
    """Identity of the model itself: its weights, config, tokenizer and recipe files."""
    return fingerprint({name: sha256_file(path) for name, path in files
                        if "/" not in name and name not in NON_MODEL_FILES})


def tag_name(scheme: str | None, when: datetime, source_revision: str | None, digest: str) -> str:
    """e.g. w8a8-20261123-a1b2c3d-9f8e7d6c5b4a: readable, sortable, unique per content."""
    scheme_part = (scheme or "custom").lower().replace("_", "-")
    return f"{scheme_part}-{when:%Y%m%d}-{(source_revision or 'local')[:7]}-{digest[:12]}"


def commit_message(manifest: dict[str, Any], gate: dict[str, Any] | None) -> tuple[str, str]:
    src = manifest["source"]
    scheme = manifest["recipe"].get("scheme") or "custom recipe"
    rev = (src.get("revision") or "local")[:12]
    if gate:
        recs = [f"{r['recovery']:.4f}" for r in gate.get("rules", [])
                if r.get("recovery") is not None]
        gate_part = f"gate {gate['status']} (recovery {', '.join(recs) or 'n/a'})"
    else:
        gate_part = "not gated"
    summary = f"requant: {scheme} of {src['model']}@{rev}, {gate_part}"
    description = "\n".join([
        f"Source: {src['model']} revision {src.get('revision') or 'local directory'}",
        f"Recipe: {manifest['recipe']['origin']} (sha256 {manifest['recipe']['sha256'][:16]})",
        f"Inputs fingerprint: {manifest['inputs_fingerprint']}",
        *(f"Gate: {r}" for r in (gate or {}).get("reasons", [])),
    ])
    return summary, description


def write_record(out: Path, card: str, summary: str, description: str, result: PublishResult,
                 note: str | None = None) -> None:
    with atomic_directory(out) as tmp:
        (tmp / "README.md").write_text(card)
        (tmp / "commit_message.txt").write_text(summary + "\n\n" + description + "\n")
        write_json_atomic(tmp / "files.json",
                          [*result.files, {"path": "README.md", "size": len(card.encode())}])
        write_json_atomic(tmp / "publish.json", result.as_record())
        if note:
            (tmp / "DRY_RUN.md").write_text(note)


def publish_checkpoint(
    hub: HubSettings, checkpoint: Path, eval_dir: Path | None, gate_dir: Path | None,
    manifest: dict[str, Any], gate: dict[str, Any] | None, out: Path, token: str | None,
    now: datetime | None = None,
) -> PublishResult:
    files = collect_files(checkpoint, eval_dir, gate_dir)
    digest = content_digest(files)
    decision = json.loads((gate_dir / "decision.json").read_text()) if gate_dir and \
        (gate_dir / "decision.json").is_file() else {}
    tag = tag_name(manifest["recipe"].get("scheme"), now or datetime.now(UTC),
                   manifest["source"].get("revision"), digest)
    repo_id = hub.repo_id or "<hub.repo_id>/<unset>"
    config = json.loads((checkpoint / "config.json").read_text())
    card = render_card(repo_id=repo_id, tag=tag, manifest=manifest, gate=gate,
                       baseline=decision.get("baseline"), candidate=decision.get("candidate"),
                       quant_config=config.get("quantization_config"))
    check_card_locally(card)
    summary, description = commit_message(manifest, gate)
    refuse_secrets(files, {"README.md": card, "commit message": f"{summary}\n{description}"},
                   worker_secrets(token, hub.secret_env))  # before anything is uploaded
    listing = [{"path": n, "size": p.stat().st_size} for n, p in files]

    if hub.repo_id is None:
        result = PublishResult(True, None, None, tag, None, False, digest, listing, str(out))
        write_record(out, card, summary, description, result, note=DRY_RUN_NOTE)
        return result

    from huggingface_hub import CommitOperationAdd

    api = hub_api(hub, token)
    with hub_errors(hub, f"publish to {hub.repo_id}"):
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        check_card_on_hub(card, hub, endpoint(hub), token)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=card.encode()))
        landed = commit_once(api, hub, operations, summary, description, digest)
        final_tag = landed.tag or ensure_tag(api, hub, tag, landed.sha, digest)
    result = PublishResult(False, hub.repo_id, landed.sha, final_tag,
                           f"{endpoint(hub)}/{hub.repo_id}/tree/{final_tag}",
                           not landed.committed_now and landed.tag is not None, digest, listing,
                           str(out))
    write_record(out, card, summary, description, result)
    return result


DRY_RUN_NOTE = (
    "# DRY RUN: nothing was published\n\nhub.repo_id is not set, so this folder holds exactly "
    "what would have been committed: files.json (the file list), README.md (the model card, its "
    "metadata checked offline by huggingface_hub's parser; the Hub's own validation runs on a "
    "real publish) and commit_message.txt. Set hub.repo_id and HF_TOKEN to publish.\n")
