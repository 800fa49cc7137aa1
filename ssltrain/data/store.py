"""Reading shards from any store: local paths, ``file://``, ``http(s)://``, ``s3://``, ``gs://``.

Remote stores go through fsspec (its HTTP filesystem, s3fs, gcsfs: the optional ``remote`` extra). A shard is read
whole and in order, in ranged chunks: a dropped connection, a 5xx or a timeout costs one chunk, which is fetched
again after an exponential backoff with jitter, so a flaky store delays a read but does not change its bytes. The
attempts are bounded (``retries`` failures in a row without progress), every socket read has a timeout, and a shard
that keeps failing raises :class:`ShardUnavailable`, which the caller counts as a skipped shard, like a corrupt one.
A shard that is not there (404, NoSuchKey) or not readable (403) fails at once: retrying cannot help.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

CHUNK_BYTES = 8 << 20  # one ranged request; a failure re-fetches at most this much
REMOTE = ("http", "https", "s3", "s3a", "gs", "gcs")
_MAX_BACKOFF_S = 60.0
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+$")
# Exceptions of the clients (aiohttp, botocore, fsspec) that a later attempt may not meet, by class name, so this
# module imports none of them: the remote extra is optional.
_TRANSIENT = {
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerTimeoutError",
    "SocketTimeoutError",
    "ConnectionTimeoutError",
    "HTTPClientError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "FSTimeoutError",
}
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 416}


class ShardUnavailable(OSError):
    """A shard could not be read: missing, forbidden, or failing after every retry. Count it as a skipped shard."""

    def __init__(self, url: str, attempts: int, last_error: BaseException | str) -> None:
        self.url, self.attempts, self.last_error = url, attempts, last_error
        self.reason = last_error if isinstance(last_error, str) else f"{type(last_error).__name__}: {last_error}"
        s = "s" * (attempts != 1)
        super().__init__(f"shard '{url}' is unavailable after {attempts} attempt{s} ({self.reason})")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (worker pools); the error as its text
        return (type(self), (self.url, self.attempts, self.reason))


class _ShortRead(OSError):
    """The store sent fewer bytes than asked for (a connection closed early): worth another attempt."""


@dataclass(frozen=True)
class StoreOptions:
    """How shards are fetched (from ``data.store``): retries, timeouts, and the options of S3-compatible stores."""

    retries: int = 5  # failures in a row (no byte gained) before a shard is given up
    backoff_s: float = 0.5  # the first retry's wait; doubled each retry, times a random factor in [0.5, 1.5)
    timeout_s: float = 60.0  # connecting, and each socket read: a stalled store is abandoned after this
    endpoint_url: str = ""  # S3-compatible stores (MinIO, Ceph, R2, moto): their endpoint; "" is AWS
    anonymous: bool = False  # public buckets: unsigned requests
    chunk_bytes: int = CHUNK_BYTES
    read_ahead: int = 2  # remote chunks fetched ahead of the reader by a thread (0: none)

    @classmethod
    def from_config(cls, cfg: Any) -> StoreOptions:
        """From a ``StoreConfig`` (``cfg.data.store``)."""
        return cls(
            retries=int(cfg.retries),
            backoff_s=float(cfg.backoff_s),
            timeout_s=float(cfg.timeout_s),
            endpoint_url=str(cfg.endpoint_url or ""),
            anonymous=bool(getattr(cfg, "anonymous", False)),
        )


def protocol_of(url: str) -> str:
    """``"file"`` for local paths and ``file://``; else the URL's scheme, lower-cased."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep and _SCHEME.match(scheme) else "file"  # one letter: a Windows drive, not a scheme


def is_remote(url: str) -> bool:
    return protocol_of(url) in REMOTE


def local_path(url: str) -> str:
    return url[len("file://") :] if url.lower().startswith("file://") else url


def join(root: str, relative: str) -> str:
    """``relative`` under ``root`` (a directory or a URL prefix)."""
    if is_remote(root):
        return root.rstrip("/") + "/" + relative.lstrip("/")
    return os.path.join(local_path(root), relative)


_fs_lock = threading.Lock()
_fs_cache: dict[tuple[str, StoreOptions, int], Any] = {}
_inherited: list[Any] = []  # a forked child's copies of its parent's clients: kept alive, never closed, see below


def _after_fork() -> None:
    global _fs_lock
    _fs_lock = threading.Lock()  # another thread may have held it at the fork
    # The child builds its own clients; the parent's copies are kept, never freed. Freeing one runs its finalizer
    # (fsspec's close_session), which unregisters the parent's keep-alive sockets from the event loop's epoll
    # instance, shared by parent and child after a fork: the parent's next read on such a socket then waits out its
    # whole timeout (data.store.timeout_s, 60 s) after each DataLoader start (bench/stream_throughput.py).
    _inherited.extend(_fs_cache.values())
    _fs_cache.clear()


os.register_at_fork(after_in_child=_after_fork)


def filesystem(url: str, options: StoreOptions) -> Any:
    """The fsspec filesystem for ``url``'s store, built once per (protocol, options, process).

    The clients' own retries are turned off where they can be (HTTP, S3), so the bounded retries here are the ones.
    """
    proto = protocol_of(url)
    key = (proto, options, os.getpid())  # a forked worker builds its own: the async clients do not survive fork
    with _fs_lock:
        if key in _fs_cache:
            return _fs_cache[key]
        try:
            import fsspec
        except ImportError as err:
            raise ImportError(f"reading '{url}' needs fsspec: pip install 'ssltrain[remote]'") from err
        t = options.timeout_s
        kwargs: dict[str, Any] = {"skip_instance_cache": True}
        if proto in ("http", "https"):
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
            kwargs.update(client_kwargs={"timeout": timeout})
        elif proto in ("s3", "s3a"):
            kwargs.update(
                anon=options.anonymous,
                config_kwargs={"connect_timeout": t, "read_timeout": t, "retries": {"total_max_attempts": 1}},
            )
            if options.endpoint_url:
                kwargs["endpoint_url"] = options.endpoint_url
        elif proto in ("gs", "gcs"):
            # gcsfs retries 5xx and dropped connections itself (6 attempts, fixed when its class is defined): on
            # gs:// a failure costs more time before the attempts here count it.
            kwargs.update(requests_timeout=t)
            if options.anonymous:
                kwargs["token"] = "anon"
        try:
            fs = fsspec.filesystem(proto, **kwargs)
        except ImportError as err:
            raise ImportError(
                f"reading '{url}' needs the remote extra: pip install 'ssltrain[remote]' ({err})"
            ) from err
        if proto in ("s3", "s3a"):
            fs.retries = 1  # s3fs retries some errors itself, for up to 5 attempts: ours bound the time instead
        _fs_cache[key] = fs
        return fs


def transient(err: BaseException) -> bool:
    """Whether another attempt may succeed: dropped connections, timeouts, 5xx, 429. Not: missing, forbidden."""
    if isinstance(err, FileNotFoundError) and err.__cause__ is not None:
        return transient(err.__cause__)  # fsspec's HTTP size lookup reports any failure (a 503 too) as not found
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status not in _PERMANENT_STATUS and (status >= 500 or status in (408, 429))
    response = getattr(err, "response", None)  # botocore.ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return isinstance(code, int) and (code >= 500 or code in (408, 429))
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, ConnectionError, _ShortRead)):
        return True
    if any(cls.__name__ in _TRANSIENT for cls in type(err).__mro__):
        return True
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err and not isinstance(err, (ValueError, TypeError)):
        return transient(cause)  # s3fs wraps botocore's errors in OSError
    return type(err) is OSError  # a bare OSError from a client: an I/O failure, not a refusal


class Retrier:
    """Runs attempts with backoff; gives up after ``retries`` failures in a row (a success resets the count)."""

    def __init__(self, url: str, options: StoreOptions, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url, self.options, self.sleep = url, options, sleep
        self.failures = 0  # in a row
        self.attempts = 0  # in all

    def call(self, fn: Callable[[], Any]) -> Any:
        while True:
            self.attempts += 1
            try:
                out = fn()
            except ShardUnavailable:
                raise
            except Exception as err:
                if not transient(err):
                    raise ShardUnavailable(self.url, self.attempts, err) from err
                self.failures += 1
                if self.failures > self.options.retries:
                    raise ShardUnavailable(self.url, self.attempts, err) from err
                delay = min(self.options.backoff_s * 2 ** (self.failures - 1), _MAX_BACKOFF_S)
                self.sleep(delay * (0.5 + random.random()))
                continue
            self.failures = 0
            return out


def shard_size(url: str, options: StoreOptions) -> int:
    """The shard's size in bytes (a HEAD / stat), with the same retries as a read."""
    if not is_remote(url):
        try:
            return os.path.getsize(local_path(url))
        except OSError as err:
            raise ShardUnavailable(url, 1, err) from err
    return _remote_size(url, filesystem(url, options), Retrier(url, options))


def _remote_size(url: str, fs: Any, retrier: Retrier) -> int:
    size = retrier.call(lambda: fs.size(url))
    if size is None:
        raise ShardUnavailable(url, retrier.attempts, "the server does not say its size (no Content-Length)")
    return int(size)


def iter_chunks(url: str, options: StoreOptions, offset: int = 0, size: int | None = None) -> Iterator[bytes]:
    """The shard's bytes from ``offset`` to its end, in order, in chunks of at most ``options.chunk_bytes``.

    ``size`` (the manifest's) saves a HEAD request. Raises :class:`ShardUnavailable` when the store keeps failing.
    """
    if not is_remote(url):
        return _local_chunks(url, options, offset)
    if options.read_ahead > 0:
        return _ahead(_remote_chunks(url, options, offset, size), options.read_ahead)
    return _remote_chunks(url, options, offset, size)


def _remote_chunks(url: str, options: StoreOptions, offset: int, size: int | None) -> Iterator[bytes]:
    fs = filesystem(url, options)
    retrier = Retrier(url, options)
    if size is None:
        size = _remote_size(url, fs, retrier)
    pos = offset
    while pos < size:
        end = min(pos + options.chunk_bytes, size)

        def fetch(start: int = pos, stop: int = end) -> bytes:
            data = fs.cat_file(url, start=start, end=stop)
            if len(data) != stop - start:
                raise _ShortRead(f"asked for bytes {start}-{stop - 1}, got {len(data)} bytes")
            return data

        data = retrier.call(fetch)
        pos = end
        yield data


def _ahead(chunks: Iterator[bytes], depth: int) -> Iterator[bytes]:
    """``chunks`` produced by a thread up to ``depth`` chunks ahead of the consumer: the next request is in flight
    while the caller decodes (or hashes and writes) the current chunk. Errors reach the consumer in order."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(("data", chunk)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            put(("error", err))

    threading.Thread(target=produce, daemon=True, name="shard-read-ahead").start()

    def consume() -> Iterator[bytes]:
        try:
            while True:
                kind, value = q.get()
                if kind == "data":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            stop.set()  # a consumer that stops early releases the producer (after its request in flight)

    return consume()


def _local_chunks(url: str, options: StoreOptions, offset: int) -> Iterator[bytes]:
    try:
        f = open(local_path(url), "rb")  # noqa: SIM115 (closed below; the generator may stop early)
    except OSError as err:
        raise ShardUnavailable(url, 1, err) from err
    with f:
        f.seek(offset)
        while chunk := f.read(options.chunk_bytes):
            yield chunk


def read_shard(url: str, options: StoreOptions, offset: int = 0, size: int | None = None) -> bytes:
    """The whole shard (from ``offset``) in memory."""
    return b"".join(iter_chunks(url, options, offset, size))


class ShardReader:
    """A read-only, sequential binary file over :func:`iter_chunks`: ``read(n)`` as a local file's, with the
    retries inside. For shards that are streamed rather than cached (larger than the cache, or no cache)."""

    def __init__(self, url: str, options: StoreOptions, offset: int = 0, size: int | None = None) -> None:
        self.url = url
        self._chunks = iter_chunks(url, options, offset, size)
        self._buf = memoryview(b"")
        self._pos = offset

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        while n < 0 or n > 0:
            if not self._buf:
                nxt = next(self._chunks, None)
                if nxt is None:
                    break
                self._buf = memoryview(nxt)
            take = len(self._buf) if n < 0 else min(n, len(self._buf))
            parts.append(bytes(self._buf[:take]))
            self._buf = self._buf[take:]
            n = n - take if n > 0 else n
        out = b"".join(parts)
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_shard(url: str, options: StoreOptions, offset: int = 0, size: int | None = None) -> BinaryIO:
    """A local file (seeked to ``offset``) for a local shard, a :class:`ShardReader` for a remote one."""
    if not is_remote(url):
        try:
            f = open(local_path(url), "rb")  # noqa: SIM115 (the caller closes it)
        except OSError as err:
            raise ShardUnavailable(url, 1, err) from err
        f.seek(offset)
        return f
    return ShardReader(url, options, offset, size)  # type: ignore[return-value]
