"""The sample stream: which sample comes at which global position, and how positions map to ranks.

Global position ``p`` (a count of samples since the run began) lies in epoch ``p // samples_per_epoch``; the epoch's
order is :class:`ssltrain.data.order.StreamOrder`'s: canonical streams over the shards, shuffled within windows,
from (seed, epoch). Global batch ``b`` is positions ``[b*G, (b+1)*G)``; rank ``r`` of ``W`` takes its positions
``p % W == r``. So the order depends on the seed, the epoch, the data and the stream settings only, never on the
number of ranks or workers, and a run resumed at any global position (on any world size dividing the batch) sees
exactly the samples it would have seen. The last incomplete global batch of an epoch is dropped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssltrain.data.order import StreamOrder, mix_scalar
from ssltrain.data.shards import IMAGE_EXTS, VIDEO_EXTS, DataError, ShardIndex, expand_shards, load_indices


@dataclass
class RawSample:
    key: str
    shard: Path
    image: bytes | None  # None when the sample has no image component or its bytes lie past a truncated end
    label: int | None
    problem: str = ""  # why the image is missing


class ShardCatalog:
    """Random access to the samples of a set of shards by global sample id (0..len-1).

    Per-sample locations are held in numpy arrays (a few dozen bytes a sample), and reads use ``os.pread``, which
    has no shared file offset, so forked DataLoader workers can share descriptors safely.
    """

    def __init__(
        self, indices: list[ShardIndex], spec: str = "", skipped_shards: list[tuple[Path, str]] | None = None
    ) -> None:
        self.skipped_shards = skipped_shards or []  # (path, reason) of shards left out because they cannot be read
        if not indices:
            why = "".join(f"; '{p}': {r}" for p, r in self.skipped_shards[:3])
            raise DataError(
                f"no readable samples in shards '{spec}'{why}; check them with `ssltrain shards verify` "
                f"or re-write them"
            )
        self.paths = [idx.path for idx in indices]
        self.spec = spec
        self.keys: list[str] = []
        shard, img_off, img_size, cls_off, cls_size = [], [], [], [], []
        self.video_samples = 0  # samples whose media is a video clip: training them needs data.modality=video
        for sid, idx in enumerate(indices):
            for entry in idx.samples:
                self.keys.append(entry.key)
                shard.append(sid)
                # the sample's media: an image, or a video clip (`ssltrain shards video`, read by data/loaders/video.py)
                ext = next((e for e in (*IMAGE_EXTS, *VIDEO_EXTS) if e in entry.components), None)
                image = entry.components[ext] if ext else None
                self.video_samples += ext in VIDEO_EXTS
                img_off.append(image.offset if image else -1)
                img_size.append(image.size if image else -1)
                cls = entry.components.get("cls")
                cls_off.append(cls.offset if cls else -1)
                cls_size.append(cls.size if cls else -1)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.img_off = np.asarray(img_off, dtype=np.int64)
        self.img_size = np.asarray(img_size, dtype=np.int64)
        self.cls_off = np.asarray(cls_off, dtype=np.int64)
        self.cls_size = np.asarray(cls_size, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def from_spec(cls, spec: str, what: str = "data.train") -> ShardCatalog:
        skipped: list[tuple[Path, str]] = []
        return cls(load_indices(expand_shards(spec, what), skipped), spec, skipped)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_labels(self) -> bool:
        return bool((self.cls_size >= 0).all())

    def _fd(self, sid: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(sid)
        if fd is None:
            try:
                fd = os.open(self.paths[sid], os.O_RDONLY)
            except OSError as err:
                raise DataError(f"cannot open shard '{self.paths[sid]}': {err.strerror}") from None
            self._fds[sid] = fd
        return fd

    def read(self, i: int) -> RawSample:
        sid = int(self.shard[i])
        path = self.paths[sid]
        try:
            fd = self._fd(sid)
        except DataError as err:  # the shard was removed or its mount went away mid-run: skip, count, go on
            return RawSample(self.keys[i], path, None, None, str(err))
        label = None
        if self.cls_size[i] >= 0:
            try:
                label = self.read_label(i)
            except ValueError as err:
                return RawSample(self.keys[i], path, None, None, str(err))
        if self.img_size[i] < 0:
            return RawSample(self.keys[i], path, None, label, "sample has no image component")
        data = os.pread(fd, int(self.img_size[i]), int(self.img_off[i]))
        if len(data) != self.img_size[i]:
            return RawSample(self.keys[i], path, None, label, "image bytes lie past the end of a truncated shard")
        return RawSample(self.keys[i], path, data, label)

    def shard_counts(self) -> np.ndarray:
        """Samples per shard, in path order (the catalog numbers samples shard after shard)."""
        return np.bincount(self.shard, minlength=len(self.paths))

    def stream_order(self, streams: int, window: int, seed: int, shuffle: bool = True) -> StreamOrder:
        """The sample order over these shards (``data.streams``, ``data.shuffle_window``)."""
        return StreamOrder(self.shard_counts(), streams, window, seed, shuffle)

    def labels(self) -> torch.Tensor:
        """All labels (for probes); an unlabeled catalog is an error, since probes need labels."""
        if not self.has_labels:
            missing = int((self.cls_size < 0).sum())
            raise DataError(f"{missing} samples in '{self.spec}' have no .cls label; probes need labeled shards")
        return torch.tensor([self.read_label(i) for i in range(len(self))], dtype=torch.long)

    def read_label(self, i: int) -> int:
        raw = os.pread(self._fd(int(self.shard[i])), int(self.cls_size[i]), int(self.cls_off[i]))
        try:
            return int(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"label {raw[:20]!r} is not an integer") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                with contextlib.suppress(OSError):
                    os.close(fd)


def sample_seed(seed: int, position: int) -> int:
    """Seed for the augmentations of the sample at a global position."""
    return mix_scalar(seed, position) & 0x7FFFFFFFFFFFFFFF


class GlobalBatchSampler:
    """For one rank, yields its share of every global batch from ``start`` to ``end`` (global positions).

    Each item is a list of ``(sample_id, position)`` pairs: the id says what to read, the position seeds its
    augmentations. Rank ``r`` of ``W`` takes the positions ``p`` with ``p % W == r``: when ``W`` divides the number
    of streams these are exactly the streams ``s % W == r``, so each shard is read by one rank an epoch. Skipping to
    ``start`` costs nothing: no sample before it is read or decoded. ``order`` may be a bare sample count: one stream
    over one shard of that many samples (a global shuffle), for tools and tests.
    """

    def __init__(
        self,
        order: StreamOrder | int,
        global_batch: int,
        seed: int = 0,
        start: int = 0,
        end: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if isinstance(order, int):
            order = StreamOrder(np.array([order]), 1, 0, seed, shuffle)
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if order.samples < global_batch:
            raise DataError(
                f"an epoch holds {order.samples} samples, fewer than one global batch of {global_batch}; lower "
                "data.batch_size"
            )
        if start % global_batch:
            raise DataError(f"start position {start} is not at a global batch boundary ({global_batch})")
        self.stream_order, self.global_batch = order, global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.samples_per_epoch = (order.samples // global_batch) * global_batch
        self.start = start
        self.end = end if end is not None else start + self.samples_per_epoch

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // self.global_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = self.rank + self.world_size * np.arange(self.local_batch)
        for batch_start in range(self.start, self.start + len(self) * self.global_batch, self.global_batch):
            epoch, offset = divmod(batch_start, self.samples_per_epoch)
            ids = self.stream_order.sample_ids(epoch, offset + mine).tolist()
            yield [(sid, batch_start + int(j)) for j, sid in zip(mine, ids)]
