"""The GPU slots a run takes from Prefect's global concurrency limit ``requant-gpu``.

The limit counts GPUs, not runs: ``scripts/prefect_apply.sh`` creates it with ``REQUANT_GPUS``
slots, and a run occupies ``quantization.gpus`` of them while it quantizes and evaluates. A run
that needs more slots than the limit has would wait forever, so that is an error at flow start.
Where no one ran prefect-apply (the embedded default, a fresh server), the run creates the limit
as prefect-apply would (``ensure_limit``: one slot per GPU the run takes, at least one; an
existing limit is never changed), so every run waits for the GPUs as production's do.
"""

from __future__ import annotations

import contextlib

from requant.errors import SettingsError

#: Created by scripts/prefect_apply.sh, or by the first run on a server without it.
GPU_LIMIT = "requant-gpu"


def gpu_slots_needed(gpus: int) -> int:
    """Quantization takes ``gpus``; evaluation's vLLM servers run on one of them."""
    return max(1, gpus)


def check_gpu_limit(gpus: int, name: str = GPU_LIMIT) -> None:
    """Refuse a run the limit can never admit; say nothing when there is no limit or server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    needed = gpu_slots_needed(gpus)
    ensure_limit(name, needed)
    limit = None
    with contextlib.suppress(ObjectNotFound), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    if limit is not None and limit.limit < needed:
        raise SettingsError(
            f"quantization.gpus={gpus} needs {needed} slots of the global concurrency limit "
            f"'{name}', which has {limit.limit} (it counts GPUs). Raise it to the GPUs the "
            f"requant-gpu pool has (REQUANT_GPUS={needed} make prefect-apply, or `prefect "
            f"global-concurrency-limit update {name} --limit {needed}`), or lower "
            "quantization.gpus."
        )


def ensure_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` if the server has none of
    that name; leave an existing one as its operator set it (idempotent, race-safe)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run made it meanwhile
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True))
