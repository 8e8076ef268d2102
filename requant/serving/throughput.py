"""A checkpoint's serving throughput, measured the way a deployment is checked: its own vLLM
server, the seed's fixed load (``search.load``), the server stopped afterwards.

A search's ``throughput`` objective ranks candidates by this figure, so every candidate gets
the same server settings and the same load; the server's start is timed apart from the load,
because only the load says how fast the model serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from requant.serving.loadtest import run_configured_load
from requant.serving.server import running_server
from requant.settings import LoadSettings, ServerSettings


def measure_throughput(model_dir: Path, server: ServerSettings, load: LoadSettings,
                       log_path: Path, *, on_gpu: bool) -> dict[str, Any]:
    """The load test's record (tokens/s, requests/s, p50/p95 latency, errors) plus the
    server's start time and what was measured under, for the candidate's record."""
    with running_server(model_dir, server, log_path, served_name="requant-throughput",
                        on_gpu=on_gpu) as handle:
        result = run_configured_load(handle.base_url, handle.served_model_name, load)
        handle.check_alive()  # a server that died under the load: its log, not a figure
        started = handle.startup_s
    return result.as_record() | {"server_startup_s": round(started, 1),
                                 "load": load.model_dump(), "on_gpu": on_gpu}
