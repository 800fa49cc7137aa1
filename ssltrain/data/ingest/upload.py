"""``ssltrain shards ... --out s3://bucket/prefix``: a shard set written to a remote store, resumably.

The writers stay local: shards are written to a staging directory (``--staging DIR``, else one under the system
temp directory named after the destination, so a rerun finds the shards an interrupted run finished), then each
finished shard is uploaded through fsspec with the store's bounded retries (:class:`ssltrain.data.store.Retrier`),
its ``.idx`` first and its ``.tar`` last, and ``manifest.json`` is written after every shard it lists is in place.

What this relies on: on S3 and GCS an object becomes visible only once its upload is complete (a single PUT, or a
multipart upload's completion), and replaces the old object whole, so uploading to the final name *is* the
temporary-name-then-commit of a filesystem, without the copy a rename costs there. A web server (``http(s)://``)
is refused before any shard is written: HTTP has no standard way to write, list or keep metadata (a plain server
answers PUT with 405), so the way to serve shards over HTTP is to write them to a directory the server serves. A
shard counts as present only when its size and sha256 match the staged one: the sha256 is stored with the object
(S3/GCS user metadata) when uploaded, so a rerun checks it with one HEAD; where no metadata is kept, the object is
read back and hashed. An interrupted upload therefore leaves at most a shard that no manifest lists, and
a rerun uploads only what is missing or different. Two runs writing one prefix at the same time are not supported
(the last manifest wins); runs one after the other (train, then val) merge into one manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssltrain.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ManifestShard, read_manifest, write_manifest
from ssltrain.data.shards import DataError, index_path_for
from ssltrain.data.store import (
    Retrier,
    ShardUnavailable,
    StoreOptions,
    filesystem,
    is_remote,
    iter_chunks,
    join,
    local_path,
    protocol_of,
)

log = logging.getLogger("ssltrain")

SHA_KEY = "sha256"  # the user-metadata key holding an uploaded shard's checksum
WRITABLE = ("file", "s3", "s3a", "gs", "gcs")  # where --out may point


class UploadError(DataError):
    """An upload kept failing (after the store's retries) or was refused; rerunning the command resumes it."""


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)  # shard paths (relative) sent by this run
    kept: list[str] = field(default_factory=list)  # already in the store with the right size and sha256
    bytes: int = 0  # sent by this run (shards, indexes, classes.json, the manifest)


def check_destination(out: str) -> None:
    """Refuse an output location shards cannot be written to, before any shard is staged: a web server, or a scheme
    no store here handles (which would otherwise become a local directory named after the URL)."""
    proto = protocol_of(out)
    if proto in ("http", "https"):
        raise UploadError(
            f"--out '{out}': shards cannot be uploaded to a web server (HTTP has no standard way to write objects); "
            "write them to a local directory (or s3://, gs://) and serve that directory over HTTP, then train "
            "from its URL"
        )
    if proto not in WRITABLE:
        raise UploadError(
            f"--out '{out}': {proto}:// is not a store shards can be written to; use a local directory, "
            "s3://bucket/prefix or gs://bucket/prefix"
        )


def default_staging(out_url: str, key: str = "") -> Path:
    """The staging directory of a destination (and ``key``: the source and prefix), the same on every rerun."""
    name = hashlib.sha256(f"{out_url.rstrip('/')}\n{key}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "ssltrain-staging" / name


@contextlib.contextmanager
def shard_output(
    out: str, options: StoreOptions, staging: str | None = None, key: str = "", workers: int = 1
) -> Iterator[Path]:
    """The local directory a writer writes into: ``out`` itself, or for a remote ``out`` a staging directory whose
    shard set is uploaded when the block ends without an error. The default staging directory is removed after a
    complete upload; one given with ``--staging`` is kept. An ``out`` no store can take is refused first."""
    check_destination(out)
    if not is_remote(out):
        yield Path(local_path(out))
        return
    directory = Path(staging) if staging else default_staging(out, key)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("staging shards in %s before uploading them to %s", directory, out)
    yield directory
    report = upload_shard_set(directory, out, options, workers)
    log.info(
        "uploaded %d shards (%.1f MB) to %s; %d were there already; manifest written",
        len(report.uploaded),
        report.bytes / 1e6,
        out,
        len(report.kept),
    )
    if not staging:
        shutil.rmtree(directory, ignore_errors=True)


def upload_shard_set(staging: Path, out_url: str, options: StoreOptions, workers: int = 1) -> UploadReport:
    """Upload the finished shards of ``staging`` that ``out_url`` lacks (or holds with another size or sha256),
    then the other plain files (``classes.json``), then ``manifest.json``: the staged shards plus those of the
    store's earlier manifest that this set does not replace."""
    check_destination(out_url)
    staging = Path(staging)
    if not (staging / MANIFEST_NAME).is_file():
        write_manifest(staging)
    staged = read_manifest(str(staging))
    previous = _remote_manifest(out_url, options)
    report = UploadReport()

    failed = threading.Event()  # a shard that fails stops the upload: the others are for the rerun

    def one(shard: ManifestShard) -> tuple[str, bool, int]:
        if failed.is_set():
            return shard.path, False, 0
        try:
            sent = _sync_shard(staging / shard.path, join(out_url, shard.path), shard, options)
        except BaseException:
            failed.set()
            raise
        return shard.path, sent > 0, sent

    pool = ThreadPoolExecutor(max(1, min(workers, 8)), thread_name_prefix="shard-upload")
    try:
        for path, sent, nbytes in pool.map(one, staged.shards):
            (report.uploaded if sent else report.kept).append(path)
            report.bytes += nbytes
    finally:
        pool.shutdown(cancel_futures=True)
    for extra in sorted(staging.iterdir()):
        plain = extra.is_file() and not extra.name.startswith(".") and extra.suffix not in (".tar", ".idx")
        if plain and extra.name != MANIFEST_NAME:  # classes.json; not the plan record, not temporaries
            report.bytes += _put(extra, join(out_url, extra.name), options)
    mine = {s.path for s in staged.shards}
    kept = [s for s in (previous.shards if previous else []) if s.path not in mine]
    merged = Manifest(out_url, sorted([*kept, *staged.shards], key=lambda s: s.path))
    tmp = staging / f".{MANIFEST_NAME}.upload"
    tmp.write_text(json.dumps(merged.to_json(), indent=1) + "\n")
    report.bytes += _put(tmp, join(out_url, MANIFEST_NAME), options)
    tmp.unlink()
    return report


def _remote_manifest(out_url: str, options: StoreOptions) -> Manifest | None:
    """The store's manifest, or None where there is none yet; one that cannot be read stops the upload rather than
    being replaced by a manifest that forgets its shards."""
    try:
        return read_manifest(out_url, options)
    except ManifestError as err:
        cause = err.__cause__
        if isinstance(cause, ShardUnavailable) and isinstance(cause.last_error, FileNotFoundError):
            return None
        raise UploadError(
            f"cannot read the store's {join(out_url, MANIFEST_NAME)} to add to it ({err}); rerun when the store "
            "answers, or delete a damaged manifest first"
        ) from err


def _sync_shard(tar: Path, url: str, shard: ManifestShard, options: StoreOptions) -> int:
    """Make ``url`` hold the staged shard and its index; the bytes sent (0: both were there already)."""
    idx = index_path_for(tar)
    idx_url = url.rsplit("/", 1)[0] + "/" + idx.name
    if _present(url, shard.bytes, shard.sha256, options) and _same_index(idx, idx_url, options):
        return 0
    sent = _put(idx, idx_url, options) if idx.is_file() else 0  # the index first: a .tar in the store has its .idx
    return sent + _put(tar, url, options, shard.sha256)


def _present(url: str, size: int, sha256: str, options: StoreOptions) -> bool:
    """Whether the store holds ``url`` with this size and sha256 (the stored checksum, else the bytes hashed)."""
    fs = filesystem(url, options)
    retrier = Retrier(url, options)
    try:
        info = retrier.call(lambda: fs.info(url))
    except ShardUnavailable as err:
        if isinstance(err.last_error, FileNotFoundError):
            return False
        raise UploadError(f"cannot check '{url}' ({err.reason}); rerun when the store answers") from err
    if int(info.get("size") or -1) != size:
        return False
    stored = _stored_sha(fs, url, info, retrier)
    if stored is None:
        digest = hashlib.sha256()
        for chunk in iter_chunks(url, options, size=size):
            digest.update(chunk)
        stored = digest.hexdigest()
    return stored == sha256


def _stored_sha(fs: Any, url: str, info: dict[str, Any], retrier: Retrier) -> str | None:
    proto = protocol_of(url)
    if proto in ("s3", "s3a"):
        return retrier.call(lambda: fs.metadata(url)).get(SHA_KEY)
    if proto in ("gs", "gcs"):
        return (info.get("metadata") or {}).get(SHA_KEY)
    return None


def _same_index(idx: Path, url: str, options: StoreOptions) -> bool:
    if not idx.is_file():
        return True
    fs = filesystem(url, options)
    try:
        return bytes(Retrier(url, options).call(lambda: fs.cat_file(url))) == idx.read_bytes()
    except ShardUnavailable as err:
        if isinstance(err.last_error, FileNotFoundError):
            return False
        raise UploadError(f"cannot check '{url}' ({err.reason}); rerun when the store answers") from err


def _put(local: Path, url: str, options: StoreOptions, sha256: str | None = None) -> int:
    """Upload one file whole to ``url`` (one atomic object on S3/GCS), retried on dropped connections, timeouts
    and 5xx; its size in the store is checked afterwards. The bytes sent."""
    fs = filesystem(url, options)
    proto = protocol_of(url)
    kwargs: dict[str, Any] = {}
    if sha256 and proto in ("s3", "s3a"):
        kwargs["Metadata"] = {SHA_KEY: sha256}
    elif sha256 and proto in ("gs", "gcs"):
        kwargs["metadata"] = {SHA_KEY: sha256}
    size = local.stat().st_size
    retrier = Retrier(url, options)
    try:
        retrier.call(lambda: fs.put_file(str(local), url, **kwargs))
        stored = retrier.call(lambda: fs.info(url)).get("size")
    except ShardUnavailable as err:
        raise UploadError(
            f"uploading '{local}' to '{url}' failed after {err.attempts} attempts ({err.reason}); run the same "
            f"command again: the shards already uploaded are kept"
        ) from err
    if stored is not None and int(stored) != size:
        raise UploadError(f"'{url}' holds {stored} bytes after uploading {size}; run the same command again")
    return size


__all__ = [
    "SHA_KEY",
    "UploadError",
    "UploadReport",
    "check_destination",
    "default_staging",
    "shard_output",
    "upload_shard_set",
]
