"""Console output of every command and every rank: one line per record, and rank 0's start-up lines only.

Every rank of a job builds the same run and would print the same lines; ranks other than 0 print errors only, unless
``SSLTRAIN_LOG_ALL_RANKS=1`` asks for all of them (prefixed ``[rank N]``). Python warnings become one log line each:
the message, and where a warning comes from another package, its category and source file (no source line, which
repeats the message's code).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

from ssltrain.core.checkpoint_layout import SINGLE_PROCESS_DCP_WARNING

ALL_RANKS_ENV = "SSLTRAIN_LOG_ALL_RANKS"
_PACKAGE = str(Path(__file__).resolve().parent.parent)  # ssltrain/: warnings raised by its own code


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool) -> None:
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or self.all_ranks or record.levelno >= logging.ERROR


def warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int) -> str:
    """A warning as one line: ssltrain's own as their message, others' with their category and file."""
    text = " ".join(str(message).split())
    if str(Path(filename).resolve()).startswith(_PACKAGE):
        return text
    site = filename.rsplit("site-packages/", 1)[-1]
    return f"{text} [{category.__name__} from {site}:{lineno}]"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logging.getLogger("py.warnings").warning(warning_line(message, category, filename, lineno))


def setup_logging(rank: int, environ: Any = None) -> None:
    """INFO to stderr with the time, on rank 0 (every rank with ``SSLTRAIN_LOG_ALL_RANKS=1``); warnings as log lines.

    Leaves logging alone where a handler is already installed (a test's capture, an embedding application).
    """
    env = os.environ if environ is None else environ
    all_ranks = env.get(ALL_RANKS_ENV, "") not in ("", "0")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank or all_ranks else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter(rank, all_ranks))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    warnings.simplefilter("default")
    # "default" overrides the module-level ignore in checkpoint.py: DCP warns on every single-process save.
    warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP_WARNING)
    warnings.showwarning = _show_warning
