"""One shard's index as a few numpy arrays, and its sample count without parsing it.

The catalog keeps per-shard state only; a shard's per-sample locations are parsed from its ``.idx`` (DALI's v1.2
text format, see :mod:`ssltrain.data.shards`) when a sample of it is first read, into a :class:`ShardTable`: offsets
and sizes in int64 arrays and the keys in one bytes buffer, decoded only when asked for. No Python object is kept
per sample, so a table costs about 60 bytes a sample and a process holds a handful of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssltrain.data.shards import (
    IMAGE_EXTS,
    INDEX_VERSION,
    VIDEO_EXTS,
    DataError,
    ShardIndex,
    _split_member,
    index_path_for,
    scan_tar,
    write_index,
)

_MEDIA = (*IMAGE_EXTS, *VIDEO_EXTS)
_VIDEO = frozenset(VIDEO_EXTS)
_LABEL, _META = "cls", "json"


@dataclass
class ShardTable:
    """Where each sample's media (image or clip), ``.cls`` label and ``.json`` metadata lie in the tar (-1: absent)."""

    key_blob: bytes  # the keys, UTF-8, end to end
    key_end: np.ndarray  # int64 [n + 1]: key j is key_blob[key_end[j]:key_end[j + 1]]
    media: np.ndarray  # int64 [n, 2]: offset, size
    label: np.ndarray  # int64 [n, 2]
    meta: np.ndarray  # int64 [n, 2]
    video: np.ndarray  # bool [n]: the media is a video clip

    def __len__(self) -> int:
        return len(self.video)

    def key(self, j: int) -> str:
        return self.key_blob[int(self.key_end[j]) : int(self.key_end[j + 1])].decode("utf-8", "surrogateescape")

    @property
    def nbytes(self) -> int:
        arrays = (self.key_end, self.media, self.label, self.meta, self.video)
        return len(self.key_blob) + sum(a.nbytes for a in arrays)


class _Builder:
    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.rows: list[tuple[int, int, int, int, int, int, bool]] = []

    def add(self, key: str, components: dict[str, tuple[int, int]]) -> None:
        ext = next((e for e in _MEDIA if e in components), None)
        media = components[ext] if ext else (-1, -1)
        label = components.get(_LABEL, (-1, -1))
        meta = components.get(_META, (-1, -1))
        self.keys.append(key.encode("utf-8", "surrogateescape"))
        self.rows.append((*media, *label, *meta, ext in _VIDEO))

    def table(self) -> ShardTable:
        rows = np.array(self.rows, dtype=np.int64).reshape(-1, 7)
        ends = np.zeros(len(self.keys) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in self.keys], out=ends[1:])
        return ShardTable(b"".join(self.keys), ends, rows[:, 0:2], rows[:, 2:4], rows[:, 4:6], rows[:, 6].astype(bool))


def parse_table(text: bytes, idx_name: str, tar_name: str) -> ShardTable:
    """A v1.2 ``.idx`` (its bytes) as a table; a malformed one raises :class:`DataError` naming it, as
    :func:`ssltrain.data.shards.read_index` does."""
    lines = text.decode("utf-8", "surrogateescape").splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(
            f"index '{idx_name}' is not a {INDEX_VERSION} index for {len(lines) - 1} samples; "
            f"delete it and it will be rebuilt from '{tar_name}'"
        )
    out = _Builder()
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise DataError(f"index '{idx_name}' line {lineno} is malformed; delete the index to rebuild it")
        try:
            comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        except ValueError:
            raise DataError(f"index '{idx_name}' line {lineno} is malformed; delete the index to rebuild it") from None
        out.add(_split_member(parts[3])[0], comps)
    return out.table()


def table_of_index(index: ShardIndex) -> ShardTable:
    out = _Builder()
    for entry in index.samples:
        out.add(entry.key, {ext: (c.offset, c.size) for ext, c in entry.components.items()})
    return out.table()


def load_table(tar: Path) -> ShardTable:
    """A local shard's table: from its ``.idx``, or from a scan of the tar where it has none."""
    idx = index_path_for(tar)
    if idx.is_file():
        return parse_table(idx.read_bytes(), str(idx), tar.name)
    return table_of_index(scan_tar(tar))


def count_samples(tar: Path) -> tuple[int, bool]:
    """``(samples, truncated)`` of a local shard, from its ``.idx`` header and line count (nothing is parsed per
    sample) and its last line's end against the tar's size; a shard without an index is scanned once and the index
    written beside it (when the tar is whole and the directory writable), as :func:`~ssltrain.data.shards.read_index`
    does."""
    idx = index_path_for(tar)
    if not idx.is_file():
        index = scan_tar(tar)
        if index.samples and not index.truncated and _writable(tar.parent):
            write_index(index, idx)
        return len(index.samples), index.truncated
    data = idx.read_bytes()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    first = data.split(b"\n", 1)[0].split()
    if len(first) != 2 or first[0] != INDEX_VERSION.encode() or not first[1].isdigit() or int(first[1]) != lines - 1:
        raise DataError(
            f"index '{idx}' is not a {INDEX_VERSION} index for {lines - 1} samples; "
            f"delete it and it will be rebuilt from '{tar.name}'"
        )
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1].split() if lines > 1 else []
    try:
        end = max((int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last) - 3, 4)), default=0)
    except ValueError:
        end = 0  # a malformed line: reported when the shard is read
    return lines - 1, end > tar.stat().st_size


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK)


__all__ = ["ShardTable", "count_samples", "load_table", "parse_table", "table_of_index"]
