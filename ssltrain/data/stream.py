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
import copy
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np
import torch

from ssltrain.data.order import StreamOrder, mix_scalar
from ssltrain.data.shard_cache import ShardCache
from ssltrain.data.shard_set import ShardSet, resolve
from ssltrain.data.shard_table import ShardTable, load_table, parse_table, table_of_index
from ssltrain.data.shards import DataError, scan_tar
from ssltrain.data.store import ShardUnavailable, StoreOptions, read_shard

if TYPE_CHECKING:
    from ssltrain.config import StoreConfig


@dataclass
class RawSample:
    key: str
    shard: Path | str
    image: bytes | None  # None when the sample has no image component or its bytes lie past a truncated end
    label: int | None
    problem: str = ""  # why the image is missing


@dataclass(frozen=True)
class CacheSettings:
    """Where remote shards are cached (``data.store.cache_dir``), its byte limit, and the download threads."""

    directory: str
    limit_bytes: int
    prefetch: int = 2


class ShardCatalog:
    """Random access to the samples of a set of shards by global sample id (0..len-1), with O(shards) state.

    Start-up knows each shard's sample count only (from a manifest, or the ``.idx`` line counts: see
    :mod:`ssltrain.data.shard_set`); a shard's index is parsed into a :class:`~ssltrain.data.shard_table.ShardTable`
    when one of its samples is first read, in the process that reads it (DataLoader workers), and tables up to
    ``TABLE_BYTES`` and a bounded number of open shards are kept per process, least recently used first out. Local
    shards are read with ``os.pread`` (no shared file offset), through descriptors each process opens for itself.
    Remote shards are read the same way from their copy in the shard cache (``data.store.cache_dir``), downloaded
    whole and checked against the manifest's sha256; :meth:`prefetch` (called by the sampler with the ids of the
    batches ahead) downloads the next ones in the background. A shard that cannot be had is skipped: its samples
    come back with a ``problem``, and are counted.
    """

    TABLE_BYTES = 64 << 20  # parsed indexes kept per process (~60 bytes a sample: a million samples' worth)
    LOCAL_FILES = 128  # open local shards kept per process
    CACHED_FILES = 8  # open cached copies per process (an evicted copy stays on disk while it is open)

    def __init__(
        self,
        shards: ShardSet,
        spec: str = "",
        options: StoreOptions | None = None,
        cache: CacheSettings | None = None,
    ) -> None:
        self.skipped_shards = shards.skipped  # (path, reason) of shards left out because they cannot be read
        if not shards.paths:
            why = "".join(f"; '{p}': {r}" for p, r in self.skipped_shards[:3])
            raise DataError(
                f"no readable samples in shards '{spec}'{why}; check them with `ssltrain shards verify` "
                f"or re-write them"
            )
        if shards.refs is not None and cache is None:
            raise DataError(
                f"shards '{spec}' are in a remote store: set data.store.cache_dir to a local directory for the shard "
                "cache (data.store.cache_bytes bounds its size); shards are read whole from it, never sample by sample"
            )
        self.paths = shards.paths
        self.spec = spec
        self.refs = shards.refs
        self.options = options or StoreOptions()
        self.cache_settings = cache
        self.counts = np.asarray(shards.counts, dtype=np.int64)
        self.first_id = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.first_id[1:])
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()  # a loader's threads may read at once (DALI's feed and its CPU fallback)
        self._tables: OrderedDict[int, ShardTable] = OrderedDict()
        self._table_bytes = 0
        self._files: OrderedDict[int, int | None] = OrderedDict()  # shard -> descriptor (None: read from the store)
        self._failed: dict[int, str] = {}  # shards this process could not have, and why
        self._cache: ShardCache | None = None
        self._labeled: bool | None = None

    @classmethod
    def from_spec(cls, spec: str, what: str = "data.train", store: StoreConfig | None = None) -> ShardCatalog:
        """The catalog of a shard spec; ``store`` (``data.store``) says how remote shards are fetched and cached."""
        options = StoreOptions.from_config(store) if store is not None else StoreOptions()
        cache = None
        if store is not None and store.cache_dir:
            cache = CacheSettings(os.path.expanduser(store.cache_dir), int(store.cache_bytes), max(1, store.prefetch))
        return cls(resolve(spec, what, options), spec, options, cache)

    # -- sizes and order ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.first_id[-1])

    @property
    def remote(self) -> bool:
        return self.refs is not None

    def shard_counts(self) -> np.ndarray:
        """Samples per shard, in path order (the catalog numbers samples shard after shard)."""
        return self.counts

    def stream_order(self, streams: int, window: int, seed: int, shuffle: bool = True) -> StreamOrder:
        """The sample order over these shards (``data.streams``, ``data.shuffle_window``)."""
        return StreamOrder(self.counts, streams, window, seed, shuffle)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, index within the shard)`` of sample ids."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.first_id, ids, side="right") - 1
        return shard, ids - self.first_id[shard]

    def _locate1(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is not in the catalog of {len(self)} samples")
        sid = int(np.searchsorted(self.first_id, i, side="right")) - 1
        return sid, i - int(self.first_id[sid])

    # -- samples -----------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> Keys:
        """The samples' keys as a lazy sequence (``keys[i]`` parses the shard's index if it is not held)."""
        return Keys(self)

    def key(self, i: int) -> str:
        sid, j = self._locate1(i)
        table = self._table_or_none(sid)
        return table.key(j) if table is not None and j < len(table) else f"#{j}"

    def read(self, i: int) -> RawSample:
        sid, j = self._locate1(i)
        path = self.paths[sid]
        table = self._table_or_none(sid)
        if table is None:
            return RawSample(f"#{j}", path, None, None, self._failed[sid])
        if j >= len(table):
            why = f"its index lists {len(table)} samples, {self.counts[sid]} were counted at start-up (it changed)"
            return RawSample(f"#{j}", path, None, None, why)
        key = table.key(j)
        label = None
        if table.label[j, 1] >= 0:
            try:
                label = self._label(sid, table, j)
            except (ValueError, DataError) as err:
                return RawSample(key, path, None, None, str(err))
        if table.media[j, 1] < 0:
            return RawSample(key, path, None, label, "sample has no image component")
        try:
            data = self._pread(sid, int(table.media[j, 0]), int(table.media[j, 1]))
        except DataError as err:  # the shard was removed, its mount went away, or the store keeps failing
            return RawSample(key, path, None, None, str(err))
        if len(data) != table.media[j, 1]:
            return RawSample(key, path, None, label, "image bytes lie past the end of a truncated shard")
        return RawSample(key, path, data, label)

    def read_label(self, i: int) -> int:
        sid, j = self._locate1(i)
        table = self._table(sid)
        if j >= len(table) or table.label[j, 1] < 0:
            raise ValueError(f"sample {i} has no .cls label")
        return self._label(sid, table, j)

    def read_meta(self, i: int) -> bytes | None:
        """The sample's ``.json`` member (video clips' fps and size), or None when it has none."""
        sid, j = self._locate1(i)
        table = self._table_or_none(sid)
        if table is None or j >= len(table) or table.meta[j, 1] < 0:
            return None
        try:
            return self._pread(sid, int(table.meta[j, 0]), int(table.meta[j, 1]))
        except DataError:
            return None

    def _label(self, sid: int, table: ShardTable, j: int) -> int:
        raw = self._pread(sid, int(table.label[j, 0]), int(table.label[j, 1]))
        try:
            return int(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"label {raw[:20]!r} is not an integer") from None

    # -- whole-catalog questions (evaluation sets; they parse every index) ------------------------------------------
    @property
    def has_labels(self) -> bool:
        if self._labeled is None:
            self._labeled = all(bool((t.label[:, 1] >= 0).all()) for _, t in self._every_table())
        return self._labeled

    def labels(self) -> torch.Tensor:
        """All labels (for probes); an unlabeled catalog is an error, since probes need labels."""
        missing = sum(int((t.label[:, 1] < 0).sum()) for _, t in self._every_table())
        if missing:
            raise DataError(f"{missing} samples in '{self.spec}' have no .cls label; probes need labeled shards")
        return torch.tensor([self.read_label(i) for i in range(len(self))], dtype=torch.long)

    def video_samples(self) -> int:
        """How many samples are video clips: 0 when the first readable shard holds none (training start-up reads one
        index, not all); otherwise counted over every shard, for the message that says so."""
        first = next((t for t in (self._table_or_none(s) for s in range(len(self.paths))) if t is not None), None)
        if first is None or not first.video.any():
            return 0
        return sum(int(t.video.sum()) for _, t in self._every_table())

    def _every_table(self) -> Iterator[tuple[int, ShardTable]]:
        for sid in range(len(self.paths)):
            table = self._table_or_none(sid)
            if table is not None:
                yield sid, table

    # -- per-process state: indexes, open shards, the cache ----------------------------------------------------------
    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked worker: its own descriptors and cache (the parent's are not its own)
            tables, nbytes = self._tables, self._table_bytes
            self._reset_process_state()
            self._tables, self._table_bytes = tables, nbytes  # parsed indexes are plain arrays: inherited as they are

    def _table_or_none(self, sid: int) -> ShardTable | None:
        try:
            return self._table(sid)
        except DataError:
            return None

    def _table(self, sid: int) -> ShardTable:
        """The shard's parsed index (least recently used ones are dropped); raises :class:`DataError` (and remembers
        why) when it cannot be had."""
        self._check_process()
        with self._lock:
            table = self._tables.get(sid)
            if table is not None:
                self._tables.move_to_end(sid)
                return table
            if sid in self._failed:
                raise DataError(self._failed[sid])
            try:
                table = self._load_table(sid)
            except (OSError, DataError) as err:
                why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                self._failed[sid] = f"shard '{self.paths[sid]}' cannot be read: {why}"
                raise DataError(self._failed[sid]) from None
            self._tables[sid] = table
            self._table_bytes += table.nbytes
            while len(self._tables) > 1 and self._table_bytes > self.TABLE_BYTES:
                self._table_bytes -= self._tables.popitem(last=False)[1].nbytes
            return table

    def _load_table(self, sid: int) -> ShardTable:
        if self.refs is None:
            return load_table(Path(self.paths[sid]))
        url = self.refs[sid].url
        idx = _index_url(url)
        try:
            text = read_shard(idx, replace(self.options, read_ahead=0))
        except ShardUnavailable as err:
            if not isinstance(err.last_error, FileNotFoundError) and "FileNotFoundError" not in err.reason:
                raise
            return self._scan_cached(sid)  # no index in the store: scan the tar's headers in the cached copy
        return parse_table(text, idx, url.rsplit("/", 1)[-1])

    def _scan_cached(self, sid: int) -> ShardTable:
        fd = self._open(sid)
        if fd is None:
            raise DataError("it has no .idx in the store and does not fit in the shard cache to be scanned")
        return table_of_index(scan_tar(Path(f"/proc/self/fd/{fd}")))

    def _open(self, sid: int) -> int | None:
        """This process's descriptor of the shard (a local file, or the cached copy of a remote one), or None for a
        remote shard read from the store directly (it does not fit in the cache). Raises :class:`DataError`."""
        self._check_process()
        if sid in self._files:
            self._files.move_to_end(sid)
            return self._files[sid]
        if sid in self._failed:
            raise DataError(self._failed[sid])
        try:
            if self.refs is None:
                fd: int | None = os.open(self.paths[sid], os.O_RDONLY)
            else:
                fd = self._shard_cache().open_fd(self.refs[sid])
        except OSError as err:  # ShardUnavailable is one
            if self.refs is None:
                raise DataError(f"cannot open shard '{self.paths[sid]}': {err.strerror}") from None
            self._failed[sid] = f"shard '{self.paths[sid]}' is skipped: {err}"
            raise DataError(self._failed[sid]) from None
        self._files[sid] = fd
        limit = self.LOCAL_FILES if self.refs is None else self.CACHED_FILES
        while len(self._files) > limit:
            _, old = self._files.popitem(last=False)
            if old is not None:
                with contextlib.suppress(OSError):
                    os.close(old)
        return fd

    def _pread(self, sid: int, offset: int, size: int) -> bytes:
        self._check_process()
        with self._lock:  # the descriptor stays open (not evicted by another thread) while it is read
            fd = self._open(sid)
            if fd is not None:
                return os.pread(fd, size, offset)
        assert self.refs is not None
        ref = self.refs[sid]
        end = min(offset + size, ref.size) if ref.size is not None else offset + size
        try:  # a shard larger than the cache: this sample's bytes only, with the store's retries
            return read_shard(ref.url, replace(self.options, read_ahead=0), offset, end)
        except ShardUnavailable as err:
            raise DataError(f"shard '{ref.url}' is skipped: {err}") from None

    def _shard_cache(self) -> ShardCache:
        with self._lock:
            if self._cache is None:
                assert self.cache_settings is not None
                c = self.cache_settings
                self._cache = ShardCache(c.directory, c.limit_bytes, self.options, c.prefetch)
            return self._cache

    def prefetch(self, ids: np.ndarray) -> None:
        """Start downloading the shards of these sample ids (the batches ahead) into the cache, in order of first
        appearance, at most a few at a time; local shards need nothing."""
        if self.refs is None or len(ids) == 0:
            return
        self._check_process()
        shards, first = np.unique(self.locate(ids)[0], return_index=True)
        cache = self._shard_cache()
        room = 2 * cache.workers - cache.in_flight()  # the rest waits for the next call: no unbounded queue
        ordered = [sid for sid in shards[np.argsort(first)].tolist() if sid not in self._failed]
        missing = [ref for ref in (self.refs[sid] for sid in ordered) if cache.path(ref) is None]
        cache.prefetch(missing[: max(0, room)])

    def close(self) -> None:
        """Close this process's shards and stop its prefetches."""
        if getattr(self, "_pid", None) != os.getpid():
            return
        for fd in self._files.values():
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._files.clear()
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=-1, _lock=None, _tables=OrderedDict(), _table_bytes=0, _files=OrderedDict(), _cache=None)
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Keys(Sequence[str]):
    """A catalog's sample keys, read on demand: ``keys[i]``, ``len(keys)``, iteration, ``keys.index(key)``."""

    def __init__(self, catalog: ShardCatalog) -> None:
        self.catalog = catalog

    def __len__(self) -> int:
        return len(self.catalog)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self.catalog.key(k) for k in range(*i.indices(len(self)))]
        return self.catalog.key(i + len(self) if i < 0 else i)


def _index_url(url: str) -> str:
    """The ``.idx`` beside a shard in a store (``NAME.tar`` -> ``NAME.idx``, as :func:`index_path_for`)."""
    head, _, name = url.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}.idx"


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
        self._mine = rank + world_size * np.arange(self.local_batch)
        self.prefetch: Callable[[np.ndarray], None] | None = None  # see with_prefetch
        self.ahead = 0

    def with_prefetch(self, prefetch: Callable[[np.ndarray], None], ahead: int = 4) -> GlobalBatchSampler:
        """This sampler, calling ``prefetch`` with the sample ids of the batch ``ahead`` items past each one it
        yields (and of the first ``ahead`` at the start): the shard cache downloads them while these are read."""
        other = copy.copy(self)
        other.prefetch, other.ahead = prefetch, max(1, ahead)
        return other

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // self.global_batch)

    def _ids(self, batch_start: int) -> list[int]:
        epoch, offset = divmod(batch_start, self.samples_per_epoch)
        return self.stream_order.sample_ids(epoch, offset + self._mine).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        starts = iter(range(self.start, self.start + len(self) * self.global_batch, self.global_batch))
        pending: deque[tuple[int, list[int]]] = deque()
        while True:
            while len(pending) <= (self.ahead if self.prefetch is not None else 0):
                batch_start = next(starts, None)
                if batch_start is None:
                    break
                pending.append((batch_start, self._ids(batch_start)))
                if self.prefetch is not None:
                    self.prefetch(np.asarray(pending[-1][1], dtype=np.int64))
            if not pending:
                return
            batch_start, ids = pending.popleft()
            yield [(sid, batch_start + int(j)) for j, sid in zip(self._mine, ids)]
