"""``ssltrain shards verify``: prove a shard set is usable before a long run spends GPU hours finding out.

For every shard: the ``.idx`` exists and agrees with the tar's own headers (sample count, keys, offsets), nothing
is cut short, every image decodes completely, every label parses. Where a directory has a ``manifest.json`` (what
training reads), it is checked too: every shard it lists exists with the listed size and sha256 (also under
``--no-decode``: the hash costs no more than the read the structure check makes, and the shard cache refuses a shard
whose sha256 differs), and every shard checked is listed. The manifest is checked whole, whatever part of the
directory the spec names. Shards are checked in parallel; the report names each problem with its shard and key, so
a bad shard can be rewritten alone.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ssltrain.data.loaders.cpu import DECODE_ERRORS, decode_image
from ssltrain.data.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, sha256_file, write_manifest
from ssltrain.data.shards import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    DataError,
    ShardIndex,
    _parse_index,
    expand_shards,
    index_path_for,
    iter_members,
    scan_tar,
    write_index,
)


@dataclass
class ShardCheck:
    path: Path
    samples: int = 0
    problems: list[str] = field(default_factory=list)  # "key: what is wrong", or a shard-level message
    sha256: str = ""  # computed where the directory has a manifest to compare with


@dataclass
class VerifyReport:
    shards: list[ShardCheck]
    manifest_problems: list[str] = field(default_factory=list)  # "path: what is wrong": listed shards not on disk

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def problems(self) -> list[str]:
        return [f"{s.path}: {p}" for s in self.shards for p in s.problems] + self.manifest_problems

    @property
    def ok(self) -> bool:
        return not self.problems


def _compare_index(indexed: ShardIndex, scanned: ShardIndex) -> list[str]:
    if len(indexed.samples) != len(scanned.samples):
        return [
            f"index lists {len(indexed.samples)} samples, the tar holds {len(scanned.samples)}; rebuild it "
            f"with --fix-index"
        ]
    for a, b in zip(indexed.samples, scanned.samples):
        where = {e: (c.offset, c.size) for e, c in a.components.items()}
        if a.key != b.key or where != {e: (c.offset, c.size) for e, c in b.components.items()}:
            return [
                f"index entry for '{a.key}' does not match the tar (tar has '{b.key}'); rebuild it with --fix-index"
            ]
    return []


def _check_sample(key: str, data: dict[str, bytes], decode: bool) -> list[str]:
    problems = []
    images = [e for e in IMAGE_EXTS if e in data]
    videos = [e for e in VIDEO_EXTS if e in data]
    if not images and not videos:
        problems.append(f"{key}: no image or video member (has: {', '.join(sorted(data)) or 'nothing'})")
    elif images and decode:
        try:
            decode_image(data[images[0]])
        except DECODE_ERRORS as err:
            problems.append(f"{key}: image does not decode ({type(err).__name__}: {err})")
    elif videos and not data[videos[0]]:
        problems.append(f"{key}: video member is empty")
    elif videos and decode:
        from ssltrain.data.video_io import FFmpegError, decode_clip, probe  # imports ffmpeg-python: only for video

        try:
            info = probe(data[videos[0]])
            decode_clip(data[videos[0]], info.width, info.height)
        except FFmpegError as err:
            problems.append(f"{key}: video does not decode ({err})")
    if "cls" in data:
        try:
            int(data["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{key}: label {data['cls'][:20]!r} is not an integer")
    return problems


def verify_shard(path: Path, decode: bool = True, fix_index: bool = False, checksum: bool = False) -> ShardCheck:
    """Check one shard; never raises for bad data, it is reported. ``fix_index`` rewrites a missing or stale index
    from the tar's headers; for a truncated tar, the index of its whole samples, so it can be read until the
    shard is re-written (the truncation stays a problem). ``checksum``: also its sha256, for the manifest check."""
    check = ShardCheck(path)
    if checksum:
        check.sha256 = sha256_file(path)
    if path.stat().st_size == 0:
        check.problems.append("the shard is empty (0 bytes); re-write it")
        return check
    try:
        scanned = scan_tar(path)
    except DataError as err:
        check.problems.append(str(err))
        return check
    idx = index_path_for(path)
    index_problems = _index_problems(path, idx, scanned) if scanned.samples or not scanned.truncated else []
    fixed = False
    if index_problems and fix_index:
        try:
            write_index(scanned, idx)
            index_problems, fixed = [], True
        except OSError as err:
            index_problems = [f"cannot write the index '{idx}' ({err.strerror or err}); check the permissions"]
    if scanned.truncated:
        whole = len(scanned.samples)
        check.problems.append(
            f"the tar is truncated: {whole} whole samples before the cut; re-write it"
            + (f" (its index now lists those {whole})" if fixed else "")
        )
    check.problems.extend(index_problems)
    for entry, data in iter_members(scanned):
        check.samples += 1
        check.problems.extend(_check_sample(entry.key, data, decode))
    return check


def _index_problems(path: Path, idx: Path, scanned: ShardIndex) -> list[str]:
    """What is wrong with the index beside ``path``, against the tar's own headers; each fixed by --fix-index."""
    if not idx.is_file():
        return [f"no index '{idx.name}' (DALI and fast start need it); write it with --fix-index"]
    try:
        return _compare_index(_parse_index(path, idx), scanned)
    except DataError as err:
        return [f"{err}; or rebuild it with --fix-index"]


def verify_shards(spec: str, workers: int = 1, decode: bool = True, fix_index: bool = False) -> VerifyReport:
    """Verify every shard named by ``spec`` (a directory, glob, brace range or list)."""
    paths = expand_shards(spec, "shards verify")
    n = len(paths)
    directories = sorted({p.parent for p in paths})
    # --fix-index rewrites the manifests below, so there is nothing to compare them with
    listed = {} if fix_index else {d: d / MANIFEST_NAME for d in directories if (d / MANIFEST_NAME).is_file()}
    sums = [p.parent in listed for p in paths]
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
            checks = list(pool.map(verify_shard, paths, [decode] * n, [fix_index] * n, sums))
    else:
        checks = [verify_shard(p, decode, fix_index, s) for p, s in zip(paths, sums)]
    if fix_index:  # and the manifest.json of each directory checked, its checksums computed again
        for directory in directories:
            write_manifest(directory, rehash=[p for p in paths if p.parent == directory])
    report = VerifyReport(checks)
    for directory, manifest_path in listed.items():
        report.manifest_problems.extend(
            _check_manifest(directory, manifest_path, [c for c in checks if c.path.parent == directory])
        )
    return report


def _check_manifest(directory: Path, manifest_path: Path, checks: list[ShardCheck]) -> list[str]:
    """Compare ``directory``'s manifest with its shards: the checked shards' problems go to their checks, the
    listed shards that are not there are returned."""
    fix = "rerun `ssltrain shards` (it keeps finished shards), or drop it from the manifest with --fix-index"
    try:
        manifest: Manifest = read_manifest(str(directory))
    except ManifestError as err:
        return [f"{manifest_path}: {err}"]
    by_name = {s.path: s for s in manifest.shards}
    for check in checks:
        entry = by_name.get(check.path.name)
        if entry is None:
            check.problems.append(f"not listed in {MANIFEST_NAME}, so training never reads it; add it with --fix-index")
            continue
        size = check.path.stat().st_size
        if size != entry.bytes:
            check.problems.append(
                f"{size} bytes, {MANIFEST_NAME} lists {entry.bytes}: changed after the manifest was written; re-write "
                "it, or record it as it is with --fix-index"
            )
        elif check.sha256 and check.sha256 != entry.sha256:
            check.problems.append(
                f"sha256 {check.sha256[:12]}... differs from {MANIFEST_NAME}'s {entry.sha256[:12]}... (same size: "
                "damaged or replaced); re-write it, or record it as it is with --fix-index"
            )
    missing = []
    for entry in manifest.shards:
        shard = directory / entry.path
        if not shard.is_file():
            missing.append(f"{shard}: listed in {MANIFEST_NAME} ({entry.samples} samples) but missing; {fix}")
    return missing
