"""Ingest a user's image tree into shards: planned up front, written in parallel, resumable after a crash.

The plan assigns every input file to a shard before anything is written (by sample count, or by bytes so that
each shard is about ``--shard-size 1GB``), from the sorted file list and the file sizes alone. So shard ``k`` holds
the same files whoever writes it and whenever: worker processes write whole shards independently, and a rerun
after an interruption keeps every finished shard (a ``.tar`` under its real name is complete, see
:func:`ssltrain.data.shards.write_shard`) and rewrites only the rest. The plan's fingerprint is stored beside the
shards so a rerun over a changed tree fails instead of mixing two plans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ssltrain.data.ingest.folders import FolderSamples, folder_sample
from ssltrain.data.shards import DataError, index_path_for, read_index, write_shard

log = logging.getLogger("ssltrain")

TAR_MEMBER_OVERHEAD = 1024  # a 512-byte header plus, on average, half a block of padding per member
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class ShardSize:
    """A shard's cap: ``samples`` per shard, or about ``bytes`` per shard (whichever was asked)."""

    samples: int | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ShardSize":
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


@dataclass
class PlannedShard:
    path: Path
    files: list[tuple[int, Path, int | None]]  # (position in the tree, file, label or None)


@dataclass
class IngestReport:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # finished by an earlier, interrupted run
    samples: int = 0  # in the shards written by this run
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason), in this run's shards

    @property
    def shards(self) -> list[Path]:
        return sorted(self.written + self.kept)


def file_sizes(source: FolderSamples) -> list[int]:
    """Each input file's size in bytes (-1: cannot be stat'ed; it will be skipped and counted when written)."""
    sizes = []
    for path, _ in source.files:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(-1)
    return sizes


def plan_shards(source: FolderSamples, sizes: list[int], out_dir: Path, prefix: str, size: ShardSize) -> list[PlannedShard]:
    """Cut the file list into shards in order: a new shard starts when the count or byte cap would be passed."""
    plans: list[PlannedShard] = []
    current: list[tuple[int, Path, int | None]] = []
    current_bytes = 0
    for position, ((path, label), file_bytes) in enumerate(zip(source.files, sizes)):
        nbytes = (file_bytes + TAR_MEMBER_OVERHEAD + (2 * TAR_MEMBER_OVERHEAD if label is not None else 0)
                  if file_bytes >= 0 else TAR_MEMBER_OVERHEAD)  # unreadable: skipped and counted when written
        full = (size.samples is not None and len(current) >= size.samples) or (
            size.bytes is not None and current and current_bytes + nbytes > size.bytes)
        if full:
            plans.append(PlannedShard(out_dir / f"{prefix}-{len(plans):06d}.tar", current))
            current, current_bytes = [], 0
        current.append((position, path, label))
        current_bytes += nbytes
    if current:
        plans.append(PlannedShard(out_dir / f"{prefix}-{len(plans):06d}.tar", current))
    return plans


def _fingerprint(source: FolderSamples, sizes: list[int], size: ShardSize) -> str:
    digest = hashlib.sha256(f"{size.samples}|{size.bytes}\n".encode())
    for (path, label), nbytes in zip(source.files, sizes):
        digest.update(f"{path.relative_to(source.root)}\t{nbytes}\t{label}\n".encode())
    return digest.hexdigest()


def _check_plan(out_dir: Path, prefix: str, fingerprint: str, root: Path) -> None:
    """Record the plan; refuse to continue over shards that an earlier run made from a different tree or size."""
    record = out_dir / f".{prefix}-plan.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise DataError(
                f"'{out_dir}' holds {prefix}-*.tar shards planned from a different input tree or --shard-size "
                f"(the files under '{root}' or their sizes changed); write to a new --out, or delete "
                f"'{out_dir}/{prefix}-*' and '{record}' to start over"
            )
        return
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise DataError(f"'{out_dir}' already holds {prefix}-*.tar shards not written by this ingest; choose another "
                        f"--out or --prefix")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "root": str(root)}))
    os.replace(tmp, record)


def _finished(path: Path) -> bool:
    """A shard under its real name is complete unless its data was cut short on disk since."""
    if not path.is_file() or not index_path_for(path).is_file():
        return False
    try:
        return not read_index(path).truncated
    except DataError:
        return False


def _write_planned(plan: PlannedShard) -> tuple[Path, int, list[tuple[Path, str]]]:
    samples, skipped = [], []
    for position, path, label in plan.files:
        sample = folder_sample(path, label, position)
        if isinstance(sample, str):
            skipped.append((path, sample))
        else:
            samples.append(sample)
    if samples:
        write_shard(samples, plan.path)
    return plan.path, len(samples), skipped


def ingest_folder(source: FolderSamples, out_dir: Path, prefix: str, size: ShardSize, workers: int = 1) -> IngestReport:
    """Write the shards of ``source`` that are not finished yet, ``workers`` shards at a time."""
    sizes = file_sizes(source)  # one stat per file: the plan and its fingerprint both come from these
    _check_plan(out_dir, prefix, _fingerprint(source, sizes, size), source.root)
    for stale in out_dir.glob(f".{prefix}-*.tar.tmp-*"):  # an interrupted run's partial shard
        stale.unlink(missing_ok=True)
    plans = plan_shards(source, sizes, out_dir, prefix, size)
    report = IngestReport()
    todo: list[PlannedShard] = []
    for plan in plans:
        if _finished(plan.path):
            report.kept.append(plan.path)
        else:
            todo.append(plan)
    if report.kept:
        log.info("%d of %d shards in %s were finished by an earlier run and are kept", len(report.kept), len(plans),
                 out_dir)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            results = list(pool.map(_write_planned, todo))
    else:
        results = [_write_planned(plan) for plan in todo]
    for path, count, skipped in results:
        if count:
            report.written.append(path)
        report.samples += count
        report.skipped.extend(skipped)
    for path, reason in report.skipped[:10]:
        log.warning("skipped '%s': %s", path, reason)
    if not report.shards:
        raise DataError(f"none of the {len(source.files)} image files under '{source.root}' could be read "
                        f"(first: '{report.skipped[0][0]}': {report.skipped[0][1]}); check that the files are intact")
    return report
