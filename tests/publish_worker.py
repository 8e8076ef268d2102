"""One publish in its own process, as a second Prefect worker (or a retried run) would make it:
``python -m tests.publish_worker job.json`` prints the PublishResult as JSON."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from requant.hub.publish import publish_checkpoint
from requant.settings import HubSettings


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = publish_checkpoint(
        HubSettings(repo_id=job["repo_id"], endpoint=job["endpoint"]), Path(job["checkpoint"]),
        *(Path(job[k]) if job.get(k) else None for k in ("eval_dir", "gate_dir")),
        job["manifest"], job.get("gate"),
        Path(job["out"]), os.environ["HF_TOKEN"], now=datetime(2026, 11, 23, tzinfo=UTC))
    print(json.dumps(result.as_record()))


if __name__ == "__main__":
    main(sys.argv[1])
