"""Publish stage: one Hub commit + an immutable tag, or a dry run that says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from requant.errors import retry_transient
from requant.hub.client import resolve_token
from requant.hub.publish import PublishResult, publish_checkpoint
from requant.settings import HubSettings


@task(name="publish", retry_condition_fn=retry_transient)
def publish(
    hub: HubSettings, checkpoint: Path, eval_dir: Path | None, gate_dir: Path | None,
    manifest: dict[str, Any], gate: dict[str, Any] | None, out_dir: Path,
) -> PublishResult:
    """The token is resolved here, inside the task, so it is never a parameter Prefect stores."""
    log = get_run_logger()
    result = publish_checkpoint(hub, checkpoint, eval_dir, gate_dir, manifest, gate, out_dir,
                                resolve_token(hub))
    if result.dry_run:
        log.warning("DRY RUN: nothing was published (hub.repo_id unset). What would have been "
                    "committed is in %s", out_dir)
        headline = "Publish: DRY RUN, nothing was published"
    elif result.no_op:
        log.info("already published: %s@%s (tag %s); no new commit", result.repo_id,
                 result.commit_sha, result.tag)
        headline = f"Publish: already on the Hub as `{result.tag}`, no new commit"
    else:
        log.info("published %s@%s, tag %s", result.repo_id, result.commit_sha, result.tag)
        headline = f"Publish: committed `{result.commit_sha}`, tag `{result.tag}`"
    create_markdown_artifact(key="publish", markdown="\n".join([
        f"# {headline}", "",
        f"- repo: `{result.repo_id or '(dry run)'}`", f"- commit: `{result.commit_sha}`",
        f"- tag: `{result.tag}`", f"- files: {len(result.files) + 1}",
        f"- content digest: `{result.content_digest[:16]}`", f"- record: `{out_dir}`",
    ]))
    return result
