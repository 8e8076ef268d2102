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
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

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


#: In a run's directory while the run waits for GPU slots other runs hold (requant status).
WAITING_MARK = "WAITING_FOR_GPU"


@contextlib.contextmanager
def gpu_slots(gpus: int, run_root: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the run's GPU slots for the block. A run that finds them taken says so, in its log
    and as ``WAITING_FOR_GPU`` in its run directory (what `requant status` shows), until it gets
    them. (No acquisition with a timeout: one cut short on a busy server can leave its slots
    granted and unreleased until their lease runs out.)"""
    from prefect.concurrency.sync import concurrency

    needed = gpu_slots_needed(gpus)
    mark = run_root / WAITING_MARK
    if _free_slots() < needed:
        mark.write_text(json.dumps({"since": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "slots": needed, "limit": GPU_LIMIT}))
        log(f"waiting for {needed} slot(s) of '{GPU_LIMIT}' that other runs hold")
    try:
        with concurrency(GPU_LIMIT, occupy=needed, strict=False):
            mark.unlink(missing_ok=True)
            log(f"holding {needed} slot(s) of '{GPU_LIMIT}'")
            yield
    finally:
        mark.unlink(missing_ok=True)


def _free_slots() -> float:
    """Slots of the limit free now (infinite without a limit or a server answer)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except Exception:  # no limit, no server: concurrency() itself decides
        return float("inf")
    return limit.limit - limit.active_slots if limit.active else float("inf")
