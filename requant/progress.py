"""Progress a person can watch: a Prefect progress artifact on the flow run, and a terminal line.

An 8B quantization runs for minutes to hours and two gsm8k evaluations send thousands of requests;
a run that shows only a start and an end looks hung. Stages report ``(fraction, message)``; this
module turns that into a progress artifact (``create_progress_artifact`` /
``update_progress_artifact``, shown on the flow run's Artifacts tab, with the message as its
description) and a line on stderr, both throttled so reporting never costs the work time.
Outside a Prefect run (plain function calls, tests) only the terminal line is written.
``REQUANT_PROGRESS_INTERVAL_S`` (default 2) is the least time between two updates.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: What stages call: report(fraction in [0, 1], message).
Report = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The default for plain calls: report nothing."""


class StageProgress:
    """One progress bar per stage (``key``: e.g. ``quantization``), Prefect + terminal."""

    def __init__(self, key: str, title: str, min_interval_s: float | None = None,
                 stream: Any = None) -> None:
        self.key, self.title = key, title
        self.min_interval_s = (float(os.environ.get("REQUANT_PROGRESS_INTERVAL_S", "2"))
                               if min_interval_s is None else min_interval_s)
        self.stream = stream if stream is not None else sys.stderr
        self._artifact_id: Any = None
        self._last = 0.0
        self._lock = threading.Lock()
        self._pending: tuple[float, str] | None = None
        self._sender: threading.Thread | None = None
        self._create()

    def _create(self) -> None:
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                return
            self._artifact_id = create_progress_artifact(
                progress=0.0, key=f"requant-progress-{self.key}",
                description=f"{self.title}: starting")
        except Exception as exc:  # progress must never fail the work it reports on
            print(f"[{self.key}] progress artifact unavailable: {exc}", file=self.stream)

    def __call__(self, fraction: float, message: str, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.min_interval_s:
                return
            self._last = now
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        print(f"[{self.key}] {percent:5.1f}%  {message}", file=self.stream, flush=True)
        if self._artifact_id is None:
            return
        # The server is told on a thread: the stage's loop (a GPU's layers) never waits on it;
        # a later update replaces one not yet sent.
        with self._lock:
            self._pending = (percent, f"{self.title}: {message}")
            sender = self._sender
            if sender is None:  # none running: start one (it exits when nothing is left)
                sender = self._sender = threading.Thread(
                    target=self._send, name="requant-progress", daemon=True)
                sender.start()
        if force:  # the last word is on the server before the stage returns
            sender.join(timeout=30)

    def _send(self) -> None:
        while True:
            with self._lock:
                pending, self._pending = self._pending, None
                if pending is None:
                    self._sender = None
                    return
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact_id, progress=pending[0],
                                         description=pending[1])
            except Exception as exc:
                print(f"[{self.key}] progress artifact not updated: {exc}", file=self.stream)

    def done(self, message: str = "done") -> None:
        self(1.0, message, force=True)


def eta_text(started: float, fraction: float) -> str:
    if fraction <= 0.0:
        return "ETA unknown"
    left = (time.monotonic() - started) * (1.0 - fraction) / fraction
    return f"ETA {int(left // 60)} min {int(left % 60):02d} s"


@contextmanager
def polling(report_once: Callable[[], None], interval_s: float = 2.0) -> Iterator[None]:
    """Call ``report_once`` every ``interval_s`` in a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                report_once()
            except Exception:  # a failed probe is skipped; the next one may answer
                continue

    thread = threading.Thread(target=loop, name="requant-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 5)
