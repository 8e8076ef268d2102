"""The search's throughput stage: a passing candidate served and put under the fixed load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from requant.atomic import write_json_atomic
from requant.serving.throughput import measure_throughput
from requant.settings import LoadSettings, ServerSettings


@task(name="measure-throughput")
def measure_candidate_throughput(name: str, model_dir: Path, server: ServerSettings,
                                 load: LoadSettings, out_dir: Path,
                                 on_gpu: bool) -> dict[str, Any]:
    """Written to ``throughput.json`` beside the server's log, the figure the objective reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = measure_throughput(model_dir, server, load, out_dir / "server.log", on_gpu=on_gpu)
    write_json_atomic(out_dir / "throughput.json", record)
    get_run_logger().info(
        "candidate %s: %.1f generated tokens/s, p95 %s s, %d of %d requests failed (%d x %d)",
        name, record["tokens_per_s"], record["p95_s"], record["errors"], record["requests"],
        load.requests, load.max_tokens)
    return record
