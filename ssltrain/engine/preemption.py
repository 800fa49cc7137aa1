"""Stop requests from the scheduler: record the signal now, act on it at the next step boundary.

Slurm sends SIGUSR2 before a job's time limit (submitit asks for it with ``--signal``) and SIGTERM on preemption or
cancellation; torchrun's agent forwards SIGTERM. Checkpointing inside a signal handler would interrupt a
collective halfway, so the handler only records the signal; the loop agrees on it across ranks, writes a checkpoint,
and then calls the handler that was installed before ours (submitit's, which requeues the job) via
:meth:`StopRequest.forward`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from ssltrain.data.signals import SCHEDULER_SIGNALS

log = logging.getLogger("ssltrain")

STOP_SIGNALS = SCHEDULER_SIGNALS  # loader workers and decoders leave these to the main process (data/signals.py)


class StopRequest:
    """Installs recording handlers for ``signals`` while in use as a context manager; restores the old ones."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: checkpointing at the end of this step, then stopping", self.received.name)

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. a notebook's worker): no handlers, no stop requests
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def forward(self) -> None:
        """Hand the recorded signal on, now that the checkpoint is written: to the handler installed before ours
        (submitit's requeue), or, where that was the default action, by dying of the signal as the sender meant."""
        if self.received is None:
            return
        previous: Callable | Any = self._previous.get(self.received)
        self.__exit__()
        if callable(previous):
            previous(int(self.received), None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), self.received)
