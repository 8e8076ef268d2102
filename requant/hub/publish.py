"""Publish: one Hub commit holding the whole candidate, then an immutable tag that pins it.

- Never partial: weights, tokenizer, recipe, manifest, lm-eval results, gate decision and model
  card go up in a single commit. LFS objects are uploaded first, content-addressed; if anything
  fails before the commit, the repo's branches are untouched, and a retry re-sends only the
  objects the Hub does not have yet.
- Idempotent: the tag ends in a digest of the model's own files; if a tag with that digest
  exists, the content is already published and nothing is committed. (huggingface_hub also drops
  unchanged files from a commit, which covers a crash between commit and tag.)
- Downstream pins the returned commit SHA, never a branch.
- The token comes from $HF_TOKEN or a Prefect Secret block, is resolved inside the task (never a
  parameter, so never recorded by Prefect), and is never logged or written anywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from requant.atomic import atomic_directory, write_json_atomic
from requant.errors import SettingsError
from requant.hashing import fingerprint, sha256_file
from requant.hub.modelcard import render_card
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


def resolve_token(hub: HubSettings) -> str | None:
    if hub.token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(hub.token_secret).get()
        except ValueError as exc:
            raise SettingsError(
                f"hub.token_secret: no Prefect Secret block named {hub.token_secret!r}. Create "
                "it (prefect block create secret) or unset hub.token_secret to use $HF_TOKEN."
            ) from exc
    return os.environ.get("HF_TOKEN") or None


def check_publish_settings(hub: HubSettings) -> None:
    """Preflight: a real publish without credentials must fail before hours of work."""
    if hub.repo_id and not resolve_token(hub):
        raise SettingsError(
            f"hub.repo_id: {hub.repo_id} is set but there is no token. Export HF_TOKEN, set "
            "hub.token_secret to a Prefect Secret block, or unset hub.repo_id for a dry run."
        )


def endpoint(hub: HubSettings) -> str:
    return hub.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


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
    card = render_card(repo_id=repo_id, tag=tag, manifest=manifest, gate=gate,
                       baseline=decision.get("baseline"), candidate=decision.get("candidate"))
    summary, description = commit_message(manifest, gate)
    listing = [{"path": n, "size": p.stat().st_size} for n, p in files]

    if hub.repo_id is None:
        result = PublishResult(True, None, None, tag, None, False, digest, listing, str(out))
        write_record(out, card, summary, description, result, note=(
            "# DRY RUN: nothing was published\n\nhub.repo_id is not set, so this folder holds "
            "exactly what would have been committed: files.json (the file list), README.md (the "
            "model card) and commit_message.txt. Set hub.repo_id and HF_TOKEN to publish.\n"))
        return result

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint(hub), token=token)
    api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
    refs = api.list_repo_refs(hub.repo_id)
    existing = next((t for t in refs.tags if t.name.endswith(f"-{digest[:12]}")), None)
    if existing is not None:
        result = PublishResult(False, hub.repo_id, existing.target_commit, existing.name,
                               f"{endpoint(hub)}/{hub.repo_id}/tree/{existing.name}", True,
                               digest, listing, str(out))
        write_record(out, card, summary, description, result)
        return result

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md",
                                         path_or_fileobj=card.encode()))
    info = api.create_commit(hub.repo_id, operations, commit_message=summary,
                             commit_description=description, revision=hub.branch)
    api.create_tag(hub.repo_id, tag=tag, revision=info.oid,
                   tag_message=f"requant candidate {digest[:12]}")
    result = PublishResult(False, hub.repo_id, info.oid, tag,
                           f"{endpoint(hub)}/{hub.repo_id}/tree/{tag}", False, digest, listing,
                           str(out))
    write_record(out, card, summary, description, result)
    return result


def move_production_marker(hub: HubSettings, sha: str, token: str | None) -> None:
    """Point the production branch at ``sha``. Called only after a verified rollout.

    The Hub has no atomic ref update, so the branch is re-created at the new commit; consumers
    that must not see the brief gap pin commit SHAs (the rollout does) rather than the branch.
    """
    from huggingface_hub import HfApi

    if hub.repo_id is None:
        return
    api = HfApi(endpoint=endpoint(hub), token=token)
    branches = {b.name: b.target_commit for b in api.list_repo_refs(hub.repo_id).branches}
    if branches.get(hub.production_ref) == sha:
        return
    if hub.production_ref in branches:
        api.delete_branch(hub.repo_id, branch=hub.production_ref)
    api.create_branch(hub.repo_id, branch=hub.production_ref, revision=sha)
