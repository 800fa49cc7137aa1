"""An audit trail of the data order: which sample keys each rank trained on at each step (``data.record_samples``).

It is how a user (and the elastic-resume test) proves that a run stopped and resumed on another number of ranks
saw the same global batches as an uninterrupted one. Each rank appends to its own file, so nothing is gathered.
A step recorded twice (a crash after recording, before the checkpoint) is read back as its last record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor


class SampleRecord:
    """Appends ``{"step", "micro", "rank", "keys", "positions"}`` lines to ``RUN/samples/rank-NNNNN.jsonl``."""

    def __init__(self, run_dir: Path, rank: int, keys: Sequence[str]) -> None:
        self.keys = keys  # the catalog's (read on demand: a key's shard index is parsed when first asked for)
        folder = run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        # Open for the whole run (closed by close()), line-buffered: a crash loses no line.
        self.file = open(folder / f"rank-{rank:05d}.jsonl", "a", buffering=1)  # noqa: SIM115
        self.rank = rank

    def write(self, step: int, micro: int, index: Tensor, position: Tensor) -> None:
        keys = [self.keys[i] for i in index.tolist()]
        record = {"step": step, "micro": micro, "rank": self.rank, "keys": keys, "positions": position.tolist()}
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def read_global_batches(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """``(step, micro) -> keys`` of the global batch, in the order of the samples' global positions."""
    shares: dict[tuple[int, int], dict[int, list[tuple[int, str]]]] = {}
    for path in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            shares.setdefault((rec["step"], rec["micro"]), {})[rec["rank"]] = list(zip(rec["positions"], rec["keys"]))
    return {
        at: [key for _, key in sorted(pair for pairs in by_rank.values() for pair in pairs)]
        for at, by_rank in sorted(shares.items())
    }
