"""The one shard writer of every ingest (image folders, video files): planned up front, written in parallel,
resumable after a crash.

An ingest reads ordered *units* (input files); each gives zero or more samples. The plan assigns every sample to a
shard before anything is written, from the samples' sizes alone (by count, or by bytes so that each shard is about
``--shard-size 1GB``). So shard ``k`` holds the same samples whoever writes it and whenever: worker processes write
whole shards independently, and a rerun after an interruption keeps every finished shard (a ``.tar`` under its real
name is complete, see :func:`ssltrain.data.shards.write_shard`) and rewrites only the rest. A fingerprint of the
inputs and settings is stored beside the shards, so a rerun over changed inputs fails instead of mixing two plans.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ssltrain.data.manifest import write_manifest
from ssltrain.data.shards import DataError, index_path_for, read_index, write_shard

log = logging.getLogger("ssltrain")

TAR_MEMBER_OVERHEAD = 1024  # a 512-byte header plus, on average, half a block of padding per member
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class ShardSize:
    """A shard's cap: ``samples`` per shard, or about ``bytes`` per shard (or both: whichever is reached first)."""

    samples: int | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> ShardSize:
        """``"10000"`` is a sample count; ``"1GB"``, ``"512MB"``, ``"1.5G"`` are byte sizes."""
        text = str(text)
        if text.strip().isdigit():
            samples = int(text)
            if samples < 1:
                raise DataError(f"--shard-size {text}: a shard needs at least 1 sample")
            return cls(samples=samples)
        match = _SIZE.match(text)
        if not match or not match.group(2):
            raise DataError(f"--shard-size '{text}' is neither a sample count (10000) nor a size (1GB, 500MB)")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        if size < 1:
            raise DataError(f"--shard-size '{text}' must be positive")
        return cls(bytes=size)


@dataclass(frozen=True)
class Unit:
    """One input of an ingest: its place among all inputs (its samples' key prefix), the file, its label."""

    position: int
    path: Path
    label: int | None = None


@dataclass
class PlannedShard:
    path: Path
    parts: list[tuple[Unit, int, int]]  # (unit, first sample, end): a run of the unit's samples, in order


@dataclass
class IngestReport:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # finished by an earlier, interrupted run
    samples: int = 0  # in the shards written by this run
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (input file, reason), in this run's shards

    @property
    def shards(self) -> list[Path]:
        return sorted(self.written + self.kept)


def plan_shards(
    units: Sequence[Unit], sizes: Sequence[Sequence[int]], out_dir: Path, prefix: str, size: ShardSize
) -> list[PlannedShard]:
    """Cut the units' samples (``sizes[u]``: the planned bytes of each sample of unit ``u``) into shards in order:
    a new shard starts when the count or the byte cap would be passed."""
    plans: list[PlannedShard] = []
    current: list[tuple[Unit, int, int]] = []
    count = nbytes = 0
    for unit, sample_sizes in zip(units, sizes):
        for i, sample_bytes in enumerate(sample_sizes):
            full = (size.samples is not None and count >= size.samples) or (
                size.bytes is not None and count > 0 and nbytes + sample_bytes > size.bytes
            )
            if full:
                plans.append(PlannedShard(out_dir / f"{prefix}-{len(plans):06d}.tar", current))
                current, count, nbytes = [], 0, 0
            if current and current[-1][0] == unit:
                current[-1] = (unit, current[-1][1], i + 1)
            else:
                current.append((unit, i, i + 1))
            count += 1
            nbytes += sample_bytes
    if current:
        plans.append(PlannedShard(out_dir / f"{prefix}-{len(plans):06d}.tar", current))
    return plans


class PlanRecord:
    """``.{prefix}-plan.json`` beside the shards: the fingerprint of the inputs and settings they are planned from."""

    def __init__(self, out_dir: Path, prefix: str) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.path = out_dir / f".{prefix}-plan.json"

    def claim(self, fingerprint: str, changed: str, **fields: Any) -> dict[str, Any]:
        """The record of an earlier run over the same inputs, or a new one; refuse shards planned from other inputs
        (``changed`` says what may have changed) or written by something else."""
        if self.path.is_file():
            previous: dict[str, Any] = json.loads(self.path.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise DataError(
                    f"'{self.out_dir}' holds {self.prefix}-*.tar shards planned from {changed}; write to a new "
                    f"--out, or delete '{self.out_dir}/{self.prefix}-*' and '{self.path}' to start over"
                )
            return previous
        if any(self.out_dir.glob(f"{self.prefix}-*.tar")):
            raise DataError(
                f"'{self.out_dir}' already holds {self.prefix}-*.tar shards not written by this ingest; "
                f"choose another --out or --prefix"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": fingerprint, **fields}
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)


def finished(path: Path) -> bool:
    """A shard under its real name is complete unless its data was cut short on disk since."""
    if not path.is_file() or not index_path_for(path).is_file():
        return False
    try:
        return not read_index(path).truncated
    except DataError:
        return False


A = TypeVar("A")
B = TypeVar("B")


def ordered_map(fn: Callable[[A], B], items: Sequence[A], workers: int) -> Iterator[B]:
    """``map(fn, items)`` over ``workers`` processes, in order, with at most ``2 * workers`` results in flight."""
    workers = min(workers, len(items))
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future[B]] = deque()
        todo = iter(items)
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


Render = Callable[[Unit], "list[dict] | str"]  # a unit's samples, or the reason it has none


def _write_planned(render: Render, plan: PlannedShard) -> tuple[Path, int, list[tuple[Path, str]]]:
    samples: list[dict] = []
    skipped: list[tuple[Path, str]] = []
    for unit, first, end in plan.parts:
        got = render(unit)
        if isinstance(got, str):
            skipped.append((unit.path, got))
        else:
            samples.extend(got[first:end])
    if samples:
        write_shard(samples, plan.path)
    return plan.path, len(samples), skipped


def write_planned(
    plans: Sequence[PlannedShard], render: Render, out_dir: Path, prefix: str, workers: int = 1
) -> IngestReport:
    """Write the planned shards that are not finished yet, ``workers`` shards at a time; keep the finished ones.

    ``render`` must be picklable (a module-level function, or a ``functools.partial`` of one) when ``workers > 1``.
    """
    report = IngestReport()
    for stale in out_dir.glob(f".{prefix}-*.tar.tmp-*"):  # an interrupted run's partial shard
        stale.unlink(missing_ok=True)
    todo: list[PlannedShard] = []
    for plan in plans:
        if finished(plan.path):
            report.kept.append(plan.path)
        else:
            todo.append(plan)
    if report.kept:
        log.info(
            "%d of %d shards in %s were finished by an earlier run and are kept", len(report.kept), len(plans), out_dir
        )
    for path, count, skipped in ordered_map(partial(_write_planned, render), todo, workers):
        if count:
            report.written.append(path)
        report.samples += count
        report.skipped.extend(skipped)
    if report.shards:  # the shard set's manifest.json: paths, sample counts, sizes, sha256
        write_manifest(out_dir, rehash=report.written)
    return report
