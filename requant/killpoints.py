"""Named steps of multi-step state changes, where a test can have this process ``kill -9``
itself, to prove the change is safe between every pair of steps.

From outside, a kill cannot be aimed between two steps a millisecond apart (the router switch
and its record), so the code names its steps and a process started with
``REQUANT_KILL_AT=<step>`` sends itself SIGKILL on reaching that step: the real signal, with the
real leftovers (processes, files, the router's state), at an exact place. Off unless the
variable is set, which nothing but the fault-injection tests does; the idea is etcd's gofail
and TiKV's fail-rs, in three lines.
"""

from __future__ import annotations

import os
import signal

ENV = "REQUANT_KILL_AT"

#: The local rollout's steps, in order: after each, ``kill -9`` must leave an endpoint that
#: serves and a state the next rollout recovers from (tests/test_rollout_kill_points.py).
LOCAL_ROLLOUT = (
    "spawned",   # the new server's process exists and is recorded pending
    "ready",     # it answers; its start-up time recorded
    "verified",  # smoke and load checks passed, nothing switched yet
    "switched",  # the router sends new requests to it; the record still says pending
    "recorded",  # recorded active; the previous revision kept warm as the fallback
    "unwarmed",  # the fallback released; the previous server still running
    "drained",   # no request left on the previous server; not stopped yet
)


#: The Kubernetes rollout's: applied (the Deployment names the new revision, unverified) and
#: verified (recorded on the Deployment, not yet in the worker's state file).
KUBERNETES_ROLLOUT = ("k8s-applied", "k8s-verified")

#: The promote flow's last step: the Hub's production marker moved, the target's record not yet
#: told (it still says the marker is pending; the next promote moves it again, a no-op).
MARKER = "marker-moved"


def kill_point(step: str) -> None:
    """SIGKILL this process here if ``REQUANT_KILL_AT`` names ``step``."""
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
