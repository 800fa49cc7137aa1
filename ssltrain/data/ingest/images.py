"""Ingest a user's image tree into shards with the resumable writer (:mod:`ssltrain.data.ingest.writer`).

Each image file is one unit of one sample, stored byte for byte (see :mod:`ssltrain.data.ingest.folders`). The plan
comes from the sorted file list and the file sizes alone, so it is known before a byte is read; the fingerprint of
the tree (relative paths, sizes, labels) and of ``--shard-size`` guards a resumed run against a changed tree.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ssltrain.data.ingest.folders import FolderSamples, folder_sample
from ssltrain.data.ingest.writer import (
    TAR_MEMBER_OVERHEAD,
    IngestReport,
    PlanRecord,
    ShardSize,
    Unit,
    plan_shards,
    write_planned,
)
from ssltrain.data.shards import DataError

log = logging.getLogger("ssltrain")


def file_sizes(source: FolderSamples) -> list[int]:
    """Each input file's size in bytes (-1: cannot be stat'ed; it will be skipped and counted when written)."""
    sizes = []
    for path, _ in source.files:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(-1)
    return sizes


def _planned_bytes(file_bytes: int, label: int | None) -> int:
    """The file's member plus, with a label, the ``cls`` member; an unreadable file is skipped when written."""
    if file_bytes < 0:
        return TAR_MEMBER_OVERHEAD
    return file_bytes + TAR_MEMBER_OVERHEAD + (2 * TAR_MEMBER_OVERHEAD if label is not None else 0)


def _fingerprint(source: FolderSamples, sizes: list[int], size: ShardSize) -> str:
    digest = hashlib.sha256(f"{size.samples}|{size.bytes}\n".encode())
    for (path, label), nbytes in zip(source.files, sizes):
        digest.update(f"{path.relative_to(source.root)}\t{nbytes}\t{label}\n".encode())
    return digest.hexdigest()


def _image_samples(unit: Unit) -> list[dict] | str:
    """The one sample of an image file, or the reason it is skipped."""
    sample = folder_sample(unit.path, unit.label, unit.position)
    return sample if isinstance(sample, str) else [sample]


def ingest_folder(source: FolderSamples, out_dir: Path, prefix: str, size: ShardSize, workers: int = 1) -> IngestReport:
    """Write the shards of ``source`` that are not finished yet, ``workers`` shards at a time."""
    sizes = file_sizes(source)  # one stat per file: the plan and its fingerprint both come from these
    changed = f"a different input tree or --shard-size (the files under '{source.root}' or their sizes changed)"
    PlanRecord(out_dir, prefix).claim(_fingerprint(source, sizes, size), changed, root=str(source.root))
    units = [Unit(position, path, label) for position, (path, label) in enumerate(source.files)]
    planned = [[_planned_bytes(nbytes, unit.label)] for unit, nbytes in zip(units, sizes)]
    report = write_planned(plan_shards(units, planned, out_dir, prefix, size), _image_samples, out_dir, prefix, workers)
    for path, reason in report.skipped[:10]:
        log.warning("skipped '%s': %s", path, reason)
    if not report.shards:
        raise DataError(
            f"none of the {len(source.files)} image files under '{source.root}' could be read "
            f"(first: '{report.skipped[0][0]}': {report.skipped[0][1]}); check that the files are intact"
        )
    return report


__all__ = ["TAR_MEMBER_OVERHEAD", "IngestReport", "ShardSize", "file_sizes", "ingest_folder"]
