"""A local cache of remote shards: a byte limit, least-recently-used eviction, and background prefetch.

A shard is downloaded to a temporary name inside the cache directory, flushed to disk, checked against the
manifest's sha256, and only then renamed to its final name: a download killed at any moment leaves a temporary
file, never a partial shard under a name that is served, and temporaries no live process is writing are removed
when a cache opens. Processes sharing a directory (the ranks of one node) coordinate through ``flock``: one lock
per shard (striped over 256 files) so each shard is downloaded once, and one for space, under which a download
reserves its full size (the temporary is sized up front) after evicting the least recently used shards. A shard
that does not fit even in an empty cache is streamed instead. Readers keep a shard they opened even if another
process evicts it (POSIX keeps an unlinked file's data while it is open).

Not fork-safe (a thread pool): build one cache per process, e.g. in each DataLoader worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ssltrain.core.files import fsync_dir
from ssltrain.data.store import ShardUnavailable, StoreOptions, is_remote, iter_chunks, open_shard, shard_size

_STRIPES = 256
_PART = ".part"


class ShardChecksumError(ShardUnavailable):
    """The downloaded bytes are not the manifest's: the shard was rewritten after the manifest, or is corrupt."""


@dataclass(frozen=True)
class ShardRef:
    """A shard to read: its URL (or local path) and, from the manifest, its size and sha256 (None: unchecked)."""

    url: str
    size: int | None = None
    sha256: str | None = None


def cache_key(ref: ShardRef) -> str:
    """The cache's file name for a shard: its URL and checksum hashed (a rewritten shard is a new entry), then its
    base name, so a listing of the cache reads."""
    digest = hashlib.sha256(f"{ref.url}\0{ref.sha256 or ''}".encode()).hexdigest()[:24]
    return f"{digest}-{os.path.basename(ref.url.rstrip('/'))}"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ShardCache:
    """``open(ref)`` returns a readable binary file of the shard, downloaded into ``cache_dir`` (or streamed when
    it is larger than ``limit_bytes``); ``prefetch(refs)`` starts downloading the next shards in the background.

    ``stats`` counts hits, downloads, bytes downloaded, streamed shards and evictions (this process's).
    """

    def __init__(self, cache_dir: str | Path, limit_bytes: int, options: StoreOptions, workers: int = 2) -> None:
        self.dir = Path(cache_dir)
        self.limit = int(limit_bytes)
        self.options = options
        self.locks = self.dir / ".locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard-prefetch")
        self._inflight: dict[str, Future[Path | None]] = {}
        self._mutex = threading.Lock()
        self._closing = threading.Event()
        self.stats = {"hits": 0, "downloads": 0, "bytes": 0, "streamed": 0, "evicted": 0}
        self.remove_stale()

    # -- public --------------------------------------------------------------------------------------------------
    def open(self, ref: ShardRef | str, offset: int = 0) -> BinaryIO:
        """The shard as a file positioned at ``offset``: a local shard as it is; a remote one from the cache,
        after a download (or the prefetch of it in flight) if needed, or a
        :class:`~ssltrain.data.store.ShardReader` if it does not fit in the cache. Raises
        :class:`ShardUnavailable` (or :class:`ShardChecksumError`) when it cannot be had."""
        ref = ShardRef(ref) if isinstance(ref, str) else ref
        if not is_remote(ref.url):
            return open_shard(ref.url, self.options, offset)
        fd = self.open_fd(ref)
        if fd is None:
            return open_shard(ref.url, self.options, offset, ref.size)
        f = os.fdopen(fd, "rb")
        f.seek(offset)
        return f

    def open_fd(self, ref: ShardRef) -> int | None:
        """A read-only descriptor of the cached copy of a remote shard (downloading it, or waiting for its prefetch,
        if needed), or None when it does not fit in the cache: read it from the store instead. The descriptor keeps
        the bytes readable even if another process evicts the shard meanwhile. Raises :class:`ShardUnavailable`."""
        for _ in range(3):  # a shard evicted by another process between its download and our open: fetch again
            path = self._wait_or_fetch(ref)
            if path is None:
                self.stats["streamed"] += 1
                return None
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            _touch(path)
            return fd
        raise ShardUnavailable(ref.url, 3, "evicted from the cache as fast as it was downloaded; raise cache_bytes")

    def prefetch(self, refs: Iterable[ShardRef | str]) -> None:
        """Start downloading these shards in the background (those not cached or in flight already)."""
        for ref in refs:
            ref = ShardRef(ref) if isinstance(ref, str) else ref
            if not is_remote(ref.url):
                continue
            key = cache_key(ref)
            with self._mutex:
                if key in self._inflight or (self.dir / key).exists():
                    continue
                self._inflight[key] = self._pool.submit(self._fetch_logged, ref, key)

    def in_flight(self) -> int:
        """Prefetches queued or running in this process."""
        with self._mutex:
            return len(self._inflight)

    def path(self, ref: ShardRef | str) -> Path | None:
        """Where the shard is cached, if it is (now)."""
        ref = ShardRef(ref) if isinstance(ref, str) else ref
        path = self.dir / cache_key(ref)
        return path if path.exists() else None

    def usage(self) -> int:
        """Bytes held: finished shards and the reservations of downloads in flight."""
        return sum(size for _, size, _ in self._entries(finished_only=False))

    def close(self) -> None:
        """Stop the prefetches: queued ones are dropped, running ones stop at their next chunk (and leave nothing)."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def remove_stale(self) -> int:
        """Delete temporaries whose writer is gone (its shard's lock is free): a killed download's leftovers.
        Returns how many; one whose lock another download holds now is left for a later sweep."""
        removed = 0
        for part in self.dir.glob(f".*{_PART}"):
            lock = self._lock_path(_key_of_part(part.name))
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # being written now
            try:
                if part.exists():
                    part.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        return removed

    # -- internals -----------------------------------------------------------------------------------------------
    def _lock_path(self, key: str) -> Path:
        stripe = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % _STRIPES
        return self.locks / f"{stripe:03d}.lock"

    def _wait_or_fetch(self, ref: ShardRef) -> Path | None:
        key = cache_key(ref)
        with self._mutex:
            future = self._inflight.get(key)
        if future is not None:
            return future.result()
        return self._fetch(ref, key)

    def _fetch_logged(self, ref: ShardRef, key: str) -> Path | None:
        try:
            return self._fetch(ref, key)
        finally:
            with self._mutex:
                self._inflight.pop(key, None)

    def _fetch(self, ref: ShardRef, key: str) -> Path | None:
        """The cached file (downloading it under the shard's lock if it is not there), or None: stream it."""
        final = self.dir / key
        if final.exists():
            self.stats["hits"] += 1
            return final
        size = ref.size if ref.size is not None else shard_size(ref.url, self.options)
        if size > self.limit:
            return None
        with _flock(self._lock_path(key)):
            if final.exists():  # another process (or thread) finished it while we waited for the lock
                self.stats["hits"] += 1
                return final
            part = self._reserve(key, size)
            if part is None:
                return None
            try:
                self._download(ref, size, part)
                os.replace(part, final)
                fsync_dir(self.dir)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        self.stats["downloads"] += 1
        self.stats["bytes"] += size
        return final

    def _reserve(self, key: str, size: int) -> Path | None:
        """Evict the least recently used shards until ``size`` more bytes fit, and claim them with a temporary of
        that size; None if they cannot fit (the rest is reserved by downloads in flight)."""
        with _flock(self.locks / "space.lock"):
            entries = self._entries(finished_only=False)
            used = sum(s for _, s, _ in entries)
            for path, nbytes, _ in sorted((e for e in entries if e[2]), key=_mtime_or_zero):
                if used + size <= self.limit:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    self.stats["evicted"] += 1
                used -= nbytes
            if used + size > self.limit and self.remove_stale():  # a killed download's reservation, found now
                used = sum(s for _, s, _ in self._entries(finished_only=False))
            if used + size > self.limit:
                return None
            part = self.dir / f".{key}.{os.getpid()}-{threading.get_ident()}{_PART}"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)  # the reservation: counted by every process from now on
            finally:
                os.close(fd)
            return part

    def _download(self, ref: ShardRef, size: int, part: Path) -> None:
        digest = hashlib.sha256()
        written = 0
        with open(part, "r+b") as f:
            chunks = iter_chunks(ref.url, self.options, 0, size)
            for chunk in chunks:
                if self._closing.is_set():
                    chunks.close()  # type: ignore[attr-defined]
                    raise ShardUnavailable(ref.url, 1, "the cache was closed during the download")
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            f.truncate(written)
            f.flush()
            os.fsync(f.fileno())
        if written != size:
            raise ShardUnavailable(ref.url, 1, f"got {written} bytes, the manifest says {size}")
        if ref.sha256 is not None and digest.hexdigest() != ref.sha256:
            raise ShardChecksumError(
                ref.url,
                1,
                f"sha256 {digest.hexdigest()} is not the manifest's {ref.sha256}: the shard changed after its "
                "manifest was written; rerun `ssltrain shards verify --fix-index` where it was written",
            )

    def _entries(self, finished_only: bool) -> list[tuple[Path, int, bool]]:
        """(path, bytes, finished) of the cache's files; a file that vanishes meanwhile is left out."""
        out = []
        with os.scandir(self.dir) as it:
            for entry in it:
                finished = not entry.name.startswith(".")
                if not finished and (finished_only or not entry.name.endswith(_PART)):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.is_file():
                    out.append((Path(entry.path), st.st_size, finished))
        return out


def _key_of_part(name: str) -> str:
    """``.KEY.PID-TID.part`` -> KEY (keys hold no dot but in the shard's base name: split at the last two)."""
    stem = name[1:].removesuffix(_PART)
    return stem.rsplit(".", 1)[0]


def _mtime_or_zero(entry: tuple[Path, int, bool]) -> float:
    try:
        return entry[0].stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _touch(path: Path) -> None:
    """Mark the shard used now (the LRU order is the files' mtimes, shared by every process)."""
    with contextlib.suppress(FileNotFoundError):
        now = time.time()
        os.utime(path, (now, now))
