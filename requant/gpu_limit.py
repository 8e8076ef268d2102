"""The GPU slots a run takes from Prefect's global concurrency limit ``requant-gpu``.

The limit counts GPUs, not runs: ``scripts/prefect_apply.sh`` creates it with ``REQUANT_GPUS``
slots, and a run occupies ``quantization.gpus`` of them while it quantizes and evaluates. A run
that needs more slots than the limit has would wait forever, so that is an error at flow start.
"""

from __future__ import annotations

import contextlib

from requant.errors import SettingsError

#: Created by scripts/prefect_apply.sh; absent (plain `requant run`): no limit.
GPU_LIMIT = "requant-gpu"


def gpu_slots_needed(gpus: int) -> int:
    """Quantization takes ``gpus``; evaluation's vLLM servers run on one of them."""
    return max(1, gpus)


def check_gpu_limit(gpus: int, name: str = GPU_LIMIT) -> None:
    """Refuse a run the limit can never admit; say nothing when there is no limit or server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    limit = None
    with contextlib.suppress(ObjectNotFound), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    needed = gpu_slots_needed(gpus)
    if limit is not None and limit.limit < needed:
        raise SettingsError(
            f"quantization.gpus={gpus} needs {needed} slots of the global concurrency limit "
            f"'{name}', which has {limit.limit} (it counts GPUs). Raise it to the GPUs the "
            f"requant-gpu pool has (REQUANT_GPUS={needed} make prefect-apply, or `prefect "
            f"global-concurrency-limit update {name} --limit {needed}`), or lower "
            "quantization.gpus."
        )
