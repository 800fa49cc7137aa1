"""What a shard spec names, and how many samples each shard holds, in O(shards) at start-up.

A remote spec (``s3://``, ``gs://``, ``https://``) is resolved through its directories' ``manifest.json`` (one
request each): shard URLs, sample counts, sizes and sha256, which the shard cache checks downloads against. A local
spec is expanded as ever (directories, globs, ``{000..009}``, lists); where a directory's manifest lists every
shard the spec takes from it, the counts are the manifest's and no index is opened; elsewhere each ``.idx`` is
counted by its lines (no per-sample object is built), and a shard without one is scanned once. Shards that are
empty or unreadable are skipped with a warning naming them, as before; a truncated one is kept and warned about.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ssltrain.data.manifest import MANIFEST_NAME, ManifestError, ManifestShard, manifest_for_spec, read_manifest
from ssltrain.data.shard_cache import ShardRef
from ssltrain.data.shard_table import count_samples
from ssltrain.data.shards import DataError, expand_shards
from ssltrain.data.store import StoreOptions, is_remote


@dataclass
class ShardSet:
    """The readable shards of a spec in catalog order, their sample counts, and what was left out."""

    paths: list[str | Path]  # local paths, or URLs in a remote store
    counts: list[int]
    refs: list[ShardRef] | None  # remote shards: URL, size and sha256 from the manifest
    skipped: list[tuple[str | Path, str]]  # (shard, why it was left out)


def spec_is_remote(spec: str) -> bool:
    return any(is_remote(part.strip()) for part in spec.split(",") if part.strip())


def resolve(spec: str, what: str, options: StoreOptions) -> ShardSet:
    """The shards of ``spec`` (``what`` names the setting in messages)."""
    if spec_is_remote(spec):
        return _remote(spec, what, options)
    return _local(expand_shards(spec, what))


def _skip(out: ShardSet, path: str | Path, reason: str) -> None:
    warnings.warn(f"shard '{path}' is skipped: {reason}; re-write it with `ssltrain shards`", stacklevel=3)
    out.skipped.append((path, reason))


def _remote(spec: str, what: str, options: StoreOptions) -> ShardSet:
    try:
        manifest = manifest_for_spec(spec, options)
    except ManifestError as err:
        raise ManifestError(f"{what}: {err}") from None
    out = ShardSet([], [], [], [])
    assert out.refs is not None
    for shard in manifest.shards:
        if shard.bytes == 0 or shard.samples == 0:
            _skip(out, shard.path, "it is empty (0 bytes)" if shard.bytes == 0 else "it holds no samples")
            continue
        out.paths.append(shard.path)
        out.counts.append(shard.samples)
        out.refs.append(ShardRef(shard.path, shard.bytes, shard.sha256))
    return out


def _manifest_counts(paths: list[Path]) -> dict[Path, ManifestShard]:
    """The manifest entries of the shards whose directory's manifest lists every shard the spec takes from it."""
    by_dir: dict[Path, list[Path]] = {}
    for p in paths:
        by_dir.setdefault(p.parent, []).append(p)
    known: dict[Path, ManifestShard] = {}
    for directory, members in by_dir.items():
        if not (directory / MANIFEST_NAME).is_file():
            continue
        try:
            listed = {s.path: s for s in read_manifest(str(directory)).shards}
        except ManifestError as err:
            warnings.warn(f"{err}; counting the shards' indexes instead", stacklevel=3)
            continue
        if all(p.name in listed for p in members):
            known.update({p: listed[p.name] for p in members})
    return known


def _local(paths: list[Path]) -> ShardSet:
    known = _manifest_counts(paths)
    out = ShardSet([], [], None, [])
    for path in paths:
        entry = known.get(path)
        truncated = False
        if entry is not None:
            count = entry.samples
            reason = "it is empty (0 bytes)" if entry.bytes == 0 else ""
        else:
            try:
                reason = "it is empty (0 bytes)" if path.stat().st_size == 0 else ""
                count, truncated = (0, False) if reason else count_samples(path)
            except (OSError, DataError) as err:
                count, reason = 0, f"it cannot be read ({err.strerror if isinstance(err, OSError) else err})"
        if not reason and count == 0:
            reason = "it holds no samples"
        if reason:
            _skip(out, path, reason)
            continue
        if truncated:
            warnings.warn(
                f"shard '{path}' is truncated: samples past its end are skipped and counted; re-write it with "
                "`ssltrain shards`",
                stacklevel=2,
            )
        out.paths.append(path)
        out.counts.append(count)
    return out


__all__ = ["ShardSet", "resolve", "spec_is_remote"]
