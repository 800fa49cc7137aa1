"""The scheduler's stop signals, kept from the helper processes of a rank: only its main process acts on them.

Slurm sends SIGUSR2 before a job's time limit and SIGTERM on preemption or ``scontrol requeue`` to every process of
the job step: each rank's main process, its DataLoader workers and their ffmpeg decoders alike. The main process
checkpoints at the next step boundary. A helper must neither run the handlers it inherited from the main process at
fork (submitit's requeue, the stop request) nor die: torch's worker exits on a SIGTERM its parent did not send, and
the main process then fails on the lost worker; a killed decoder turns a good clip into a skipped one.

So a helper is started with the signals blocked (:func:`blocked`, inherited across fork and exec), and a loader
worker then ignores SIGUSR2 and takes SIGTERM on a waiting thread that exits only when its parent sends it (the
loader's shutdown, multiprocessing's exit) or is gone (:func:`shield_worker`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SCHEDULER_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@contextmanager
def blocked(signals: tuple[signal.Signals, ...] = SCHEDULER_SIGNALS) -> Iterator[None]:
    """Hold ``signals`` back from this thread while it starts helper processes: a child inherits the mask, so
    none reaches it before it has set its own handling. What arrived meanwhile is delivered on leaving."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing sends these
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker(signals: tuple[signal.Signals, ...] = SCHEDULER_SIGNALS) -> None:
    """In a loader worker's main thread, first thing: ignore ``signals``, except that SIGTERM from the parent (or
    once the parent is gone) still ends the worker, as torch's own worker handler does for it.

    SIGTERM stays blocked in every thread of the worker (threads and children inherit the mask; torch's C handler
    never runs) and one thread waits for it, reading the sender's pid, which a Python handler cannot see.
    """
    if hasattr(signal, "SIGCONT"):  # Slurm's SIGCONT before SIGTERM: submitit's inherited handler would only log
        signal.signal(signal.SIGCONT, signal.SIG_DFL)
    wait = signal.SIGTERM in signals and hasattr(signal, "sigwaitinfo")  # not on macOS: torch's handler stays
    for sig in signals:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if wait:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), name="sigterm", daemon=True).start()
    rest = [s for s in signals if not (wait and s == signal.SIGTERM)]
    if rest and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, rest)  # an ignored one that arrived since the fork is dropped


def _exit_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)
