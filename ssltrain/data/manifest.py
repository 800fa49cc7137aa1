"""``manifest.json``: one file per shard directory listing its shards (relative path, samples, bytes, sha256).

Start-up reads this one file instead of every shard's index (O(shards), one request against a remote store), and
the shard cache checks each download against its sha256. ``ssltrain shards`` writes it when it finishes and
``ssltrain shards verify --fix-index`` rewrites it; sample counts come from the shards' ``.idx`` headers, so writing
it costs one sequential read per new shard (the checksum), not a parse of every index.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from ssltrain.core.files import write_atomic
from ssltrain.data.shard_cache import ShardRef
from ssltrain.data.shards import INDEX_VERSION, DataError, _expand_braces, index_path_for, read_index
from ssltrain.data.store import ShardUnavailable, StoreOptions, is_remote, join, local_path, read_shard

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(DataError):
    """A manifest is missing or does not hold what it should; the message names the file and the fix."""


@dataclass(frozen=True)
class ManifestShard:
    path: str  # relative to the manifest's directory
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """The shards of one directory (``root``: a local directory or a URL prefix)."""

    root: str
    shards: list[ManifestShard]

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def url(self, shard: ManifestShard) -> str:
        return join(self.root, shard.path)

    def refs(self) -> list[ShardRef]:
        """What :meth:`ssltrain.data.shard_cache.ShardCache.open` takes: each shard's URL, size and sha256."""
        return [ShardRef(self.url(s), s.bytes, s.sha256) for s in self.shards]

    def select(self, pattern: str) -> Manifest:
        """The shards whose relative path matches a glob (``train-*.tar``)."""
        return Manifest(self.root, [s for s in self.shards if fnmatch.fnmatchcase(s.path, pattern)])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "total_samples": self.total_samples,
            "shards": [asdict(s) for s in self.shards],
        }


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _index_count(tar: Path) -> int:
    """The sample count in the ``.idx`` header (``v1.2 N``); the tar's own scan where there is no index."""
    idx = index_path_for(tar)
    with contextlib.suppress(OSError, ValueError):
        with open(idx) as f:
            head = f.readline().split()
        if len(head) == 2 and head[0] == INDEX_VERSION:
            return int(head[1])
    return len(read_index(tar).samples)


def build_manifest(directory: Path, rehash: Iterable[Path] | None = None) -> Manifest:
    """The manifest of every ``*.tar`` in ``directory``. Checksums of the existing manifest are kept for shards of
    the same size that are not in ``rehash``; ``rehash=None`` computes every one."""
    directory = Path(directory)
    again = None if rehash is None else {Path(p).resolve() for p in rehash}
    known: dict[str, ManifestShard] = {}
    if again is not None and (directory / MANIFEST_NAME).is_file():
        with contextlib.suppress(ManifestError):
            known = {s.path: s for s in read_manifest(str(directory)).shards}
    shards = []
    for tar in sorted(directory.glob("*.tar")):
        size = tar.stat().st_size
        old = known.get(tar.name)
        if again is not None and tar.resolve() not in again and old is not None and old.bytes == size:
            sha = old.sha256
        else:
            sha = sha256_file(tar)
        shards.append(ManifestShard(tar.name, _index_count(tar), size, sha))
    return Manifest(str(directory), shards)


def write_manifest(directory: Path, rehash: Iterable[Path] | None = None) -> Path:
    """Build and write ``directory/manifest.json`` atomically (temporary file, fsync, rename), under a lock so
    two writers of one directory (ingests of two prefixes) do not lose each other's shards."""
    directory = Path(directory)
    target = directory / MANIFEST_NAME
    with _locked(directory):
        manifest = build_manifest(directory, rehash)
        write_atomic(target, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())
    return target


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory itself (flock takes directories too): no lock file is left beside the
    shards."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fix(root: str) -> str:
    if is_remote(root):
        return f"write it where the shards were made (ssltrain shards verify DIR --fix-index) and upload it to {root}"
    return f"run `ssltrain shards verify {local_path(root)} --fix-index`"


def read_manifest(location: str, options: StoreOptions | None = None) -> Manifest:
    """Read and validate the manifest of a shard directory (local, ``file://``, or a remote URL prefix); a
    location ending in ``manifest.json`` names the file itself."""
    options = options or StoreOptions()
    location = str(location)
    root = location[: -len(MANIFEST_NAME)].rstrip("/") if location.endswith(MANIFEST_NAME) else location
    root = root or "."
    url = join(root, MANIFEST_NAME)
    try:
        raw = read_shard(url, options)
    except ShardUnavailable as err:
        missing = isinstance(err.last_error, FileNotFoundError)
        what = f"no {MANIFEST_NAME} in {root}" if missing else f"cannot read {url} ({err})"
        raise ManifestError(f"{what}: {_fix(root)}") from err
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{url} is not valid JSON ({err}): {_fix(root)}") from None
    return _parse(data, url, root)


def _parse(data: Any, url: str, root: str) -> Manifest:
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{url}: {what}; rewrite it: {_fix(root)}")

    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        version = data.get("format") if isinstance(data, dict) else None
        raise bad(f"format {version!r}, this ssltrain reads format {FORMAT_VERSION}")
    entries = data.get("shards")
    if not isinstance(entries, list):
        raise bad("no 'shards' list")
    shards, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"shard {i} is not an object")
        path, samples, nbytes, sha = e.get("path"), e.get("samples"), e.get("bytes"), e.get("sha256")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise bad(f"shard {i}: path {path!r} is not a relative path inside the directory")
        if path in seen:
            raise bad(f"shard '{path}' is listed twice")
        seen.add(path)
        for name, value in (("samples", samples), ("bytes", nbytes)):
            if not _is_count(value):
                raise bad(f"shard '{path}': {name} {value!r} is not a count")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise bad(f"shard '{path}': sha256 {sha!r} is not a hex digest")
        shards.append(ManifestShard(path, cast(int, samples), cast(int, nbytes), sha))
    manifest = Manifest(root, shards)
    if data.get("total_samples") != manifest.total_samples:
        raise bad(f"total_samples {data.get('total_samples')!r} is not the shards' sum {manifest.total_samples}")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_for_spec(spec: str, options: StoreOptions | None = None) -> Manifest:
    """The shards a ``data.train`` spec names, from their directories' manifests: comma-separated parts, each a
    directory or URL prefix (all its shards), or one with a glob or ``{000..009}`` range in its last component
    (``s3://bucket/set/train-*.tar``). One manifest is read per directory."""
    roots: dict[str, Manifest] = {}
    picked: list[ManifestShard] = []
    urls: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        for item in _expand_braces(part):
            base = item.rstrip("/").rsplit("/", 1)
            names_shards = item.endswith(".tar") or any(ch in base[-1] for ch in "*?[")
            root, pattern = (base[0] if len(base) == 2 else ".", base[-1]) if names_shards else (item, "*.tar")
            if root not in roots:
                roots[root] = read_manifest(root, options)
            chosen = roots[root].select(pattern)
            if not chosen.shards:
                raise ManifestError(f"no shard in {join(root, MANIFEST_NAME)} matches '{pattern}' (from '{spec}')")
            for s in chosen.shards:
                url = chosen.url(s)
                if url not in urls:
                    urls.append(url)
                    picked.append(ManifestShard(url, s.samples, s.bytes, s.sha256))
    return Manifest("", picked)
