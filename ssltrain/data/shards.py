"""WebDataset tar shards: writing them (with webdataset) and the per-shard sample index.

Each ``NAME.tar`` gets a ``NAME.idx`` beside it in DALI's ``wds2idx`` v1.2 text format
(``v1.2 <samples>`` then one line per sample: ``ext offset size member-name`` for each component), so the same
index serves DALI's ``fn.readers.webdataset(index_paths=...)`` and our own random-access reader. Random access
by byte offset is what lets the sample order be a function of (seed, epoch, data) alone, independent of how many
ranks and workers read, and lets a resumed run jump to its position without decoding what it skips.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

INDEX_VERSION = "v1.2"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
VIDEO_EXTS = ("mp4", "webm", "mkv")  # clips written by `ssltrain shards video`


class DataError(ValueError):
    """Shards cannot be used as given; the message names the path and the fix."""


@dataclass
class Component:
    offset: int  # byte offset of the member's data inside the tar
    size: int
    name: str  # member name inside the tar


@dataclass
class SampleEntry:
    key: str
    components: dict[str, Component] = field(default_factory=dict)


@dataclass
class ShardIndex:
    path: Path
    samples: list[SampleEntry]
    truncated: bool = False  # the tar ends before the data the index (or its headers) promise


def index_path_for(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's key/extension rule: the extension starts at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def scan_tar(tar_path: Path) -> ShardIndex:
    """Build the index of a tar by reading its headers (no member data is decoded).

    A truncated tar yields the samples before the cut and ``truncated=True``. Only the sample the cut falls in is
    dropped (some of its members may be missing) rather than indexed with bytes that are not there; a sample that
    ends before it is kept. Where the cut leaves the name of the member it falls in unknown (it falls in the
    member's headers, or between members), the last sample is dropped too: more of its members may have followed.
    """
    samples: list[SampleEntry] = []
    file_size = tar_path.stat().st_size
    truncated, cut_key = False, None  # cut_key: the key of the member the cut falls in, where it is known
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            try:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = _split_member(member.name)
                    if not key or key.endswith("/") or not ext:
                        continue
                    if member.offset_data + member.size > file_size:
                        truncated, cut_key = True, key
                        break
                    if not samples or samples[-1].key != key:
                        samples.append(SampleEntry(key))
                    samples[-1].components[ext] = Component(member.offset_data, member.size, member.name)
                else:  # tarfile stops quietly at a header it cannot read: an end-of-archive block, or a cut
                    truncated, cut_key = _cut_at(tar_path, tar.offset, file_size)
            except (tarfile.ReadError, EOFError):  # a header cut short (pax), or a member's padding
                truncated, cut_key = True, _cut_at(tar_path, tar.offset, file_size)[1]
    except (tarfile.ReadError, EOFError, OSError) as err:
        if file_size == 0:
            return ShardIndex(tar_path, [], truncated=False)
        truncated, cut_key = True, None
        if not samples:
            raise DataError(
                f"shard '{tar_path}' is not a readable tar file ({err}); re-write it with `ssltrain shards`"
            ) from None
    if truncated and samples and _may_hold(samples[-1].key, cut_key):
        samples.pop()  # the cut falls in it, or may: only whole samples are indexed
    return ShardIndex(tar_path, samples, truncated)


def _may_hold(key: str, cut_key: str | None) -> bool:
    """Whether the member named ``cut_key`` may belong to the sample ``key`` (a name read from a header cut before
    its ustar prefix lacks its leading directories)."""
    return cut_key is None or key == cut_key or key.endswith("/" + cut_key)


def _cut_at(tar_path: Path, offset: int, file_size: int) -> tuple[bool, str | None]:
    """Where tarfile stopped reading headers at ``offset``: ``(truncated, key of the member the cut falls in)``.

    A block of zeros there (or zeros to the end, less than a block) is the end-of-archive marker: nothing is missing.
    """
    with open(tar_path, "rb") as f:
        f.seek(offset)
        rest = f.read(min(max(file_size - offset, 0), 1 << 20))
    if rest and not rest[: tarfile.BLOCKSIZE].strip(b"\0"):
        return False, None
    name = _cut_member_name(rest)
    return True, None if name is None else _split_member(name)[0]


def _cut_member_name(rest: bytes) -> str | None:
    """The name of the member whose headers (ustar, and pax or GNU long-name ones before it) begin ``rest`` and are
    cut short, where what is left of them says it; None where it does not."""
    pos, path = 0, None
    while len(rest) - pos >= tarfile.BLOCKSIZE:
        try:
            info = tarfile.TarInfo.frombuf(rest[pos : pos + tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return None
        data = rest[pos + tarfile.BLOCKSIZE : pos + tarfile.BLOCKSIZE + info.size]
        whole = len(data) == info.size
        if info.type == tarfile.XHDTYPE:  # pax: records for the next header; "path" overrides its name
            path = _pax_path(data) or path
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            path = data.rstrip(b"\0").decode("utf-8", "surrogateescape") if whole else None
        elif info.type != tarfile.XGLTYPE:  # the member's own header
            return None if whole else (path or info.name)  # its data complete: the cut is not in this member
        if not whole:
            return path if info.type == tarfile.XHDTYPE else None
        pos += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    block = rest[pos:]  # the cut falls in this header block
    if path is not None:
        return path
    if len(block) < 100 or (len(block) > 156 and block[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        return None  # its name field is cut, or it is a pax or long-name header: the name comes later
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # without a ustar prefix, which may follow
    return None if not name or name.startswith("././@") or "PaxHeader" in name else name


def _pax_path(data: bytes) -> str | None:
    """The "path" record among the whole pax records ("LENGTH key=value\\n") of ``data``."""
    pos, path = 0, None
    while (space := data.find(b" ", pos)) > pos and data[pos:space].isdigit():
        end = pos + int(data[pos:space])
        if end > len(data) or end <= space:
            break
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos = end
    return path


def write_index(index: ShardIndex, idx_path: Path | None = None) -> Path:
    """Write the DALI v1.2 index atomically (temporary file, then rename)."""
    idx_path = idx_path or index_path_for(index.path)
    tmp = idx_path.with_name(f".{idx_path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(index.samples)}\n")
        for sample in index.samples:
            f.write(" ".join(f"{ext} {c.offset} {c.size} {c.name}" for ext, c in sample.components.items()) + "\n")
    os.replace(tmp, idx_path)
    return idx_path


def read_index(tar_path: Path) -> ShardIndex:
    """Read ``NAME.idx`` if present and well formed, else scan the tar (and cache the index when we may write)."""
    idx_path = index_path_for(tar_path)
    if idx_path.is_file():
        index = _parse_index(tar_path, idx_path)
        end = max((c.offset + c.size for s in index.samples for c in s.components.values()), default=0)
        index.truncated = end > tar_path.stat().st_size
        return index
    index = scan_tar(tar_path)
    if index.samples and not index.truncated and os.access(tar_path.parent, os.W_OK):
        write_index(index, idx_path)
    return index


def _parse_index(tar_path: Path, idx_path: Path) -> ShardIndex:
    lines = idx_path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(
            f"index '{idx_path}' is not a {INDEX_VERSION} index for {len(lines) - 1} samples; "
            f"delete it and it will be rebuilt from '{tar_path.name}'"
        )
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise DataError(f"index '{idx_path}' line {lineno} is malformed; delete the index to rebuild it")
        entry = SampleEntry(_split_member(parts[3])[0])
        for i in range(0, len(parts), 4):
            ext, offset, size, name = parts[i : i + 4]
            entry.components[ext] = Component(int(offset), int(size), name)
        samples.append(entry)
    return ShardIndex(tar_path, samples)


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[: match.start()] + str(i).zfill(width) + pattern[match.end() :]))
    return out


def expand_shards(spec: str, what: str = "data.train") -> list[Path]:
    """Resolve a shard spec: directories (their ``*.tar``), globs, ``{000..009}`` ranges, comma-separated lists."""
    if not spec or not spec.strip():
        raise DataError(f"no shards given for '{what}': set it to a shard directory or pattern")
    paths: list[Path] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        for item in _expand_braces(os.path.expanduser(part)):
            p = Path(item)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise DataError(
                        f"'{p}' ({what}) holds no .tar shards; write some with `ssltrain shards ... --out {p}`"
                    )
                paths.extend(found)
            elif any(ch in item for ch in "*?["):
                found = sorted(Path(x) for x in glob.glob(item))
                if not found:
                    raise DataError(
                        f"no shards match '{item}' ({what}); check the path or write shards with `ssltrain shards`"
                    )
                paths.extend(found)
            elif p.is_file():
                paths.append(p)
            else:
                raise DataError(
                    f"shard '{p}' ({what}) does not exist; check the path or write shards with `ssltrain shards`"
                )
    return paths


def load_indices(paths: Iterable[Path], skipped: list[tuple[Path, str]] | None = None) -> list[ShardIndex]:
    """Index every shard; a shard that is empty or cannot be read is skipped with a warning naming it (and appended
    to ``skipped`` as ``(path, reason)``), a truncated one is kept for its intact samples and warned about."""
    indices = []
    for path in paths:
        index: ShardIndex | None = None
        try:
            reason = "it is empty (0 bytes)" if path.stat().st_size == 0 else ""
            index = None if reason else read_index(path)
        except (OSError, DataError) as err:
            reason = f"it cannot be read ({err.strerror if isinstance(err, OSError) else err})"
        if index is not None and not index.samples:
            reason = "it holds no samples"
        if reason or index is None:
            warnings.warn(f"shard '{path}' is skipped: {reason}; re-write it with `ssltrain shards`", stacklevel=2)
            if skipped is not None:
                skipped.append((path, reason))
            continue
        if index.truncated:
            warnings.warn(
                f"shard '{path}' is truncated: samples past its end are skipped and counted; re-write it with "
                "`ssltrain shards`",
                stacklevel=2,
            )
        indices.append(index)
    return indices


def write_shards(
    samples: Iterable[dict],
    out_dir: Path,
    prefix: str,
    max_count: int = 10_000,
    max_size: int = 1 << 30,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write samples (webdataset dicts: ``__key__`` plus ``ext: bytes|int|str``) into ``prefix-NNNNNN.tar`` shards.

    Each shard is written under a temporary name by webdataset's ShardWriter, indexed, then renamed, so a
    directory never holds a half-written shard under a real name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tmp_pattern = str(out_dir / f".{prefix}-%06d.tar.tmp")

    def finish(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = out_dir / tmp.name[1:].removesuffix(".tmp")
        index = scan_tar(tmp)
        index.path = final
        write_index(index, index_path_for(final))
        os.replace(tmp, final)
        written.append(final)

    count = 0
    with wds.ShardWriter(tmp_pattern, maxcount=max_count, maxsize=max_size, post=finish, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
            if progress is not None:
                progress(count)
    return written


def write_shard(samples: Iterable[dict], final: Path) -> ShardIndex:
    """Write one shard at ``final`` atomically: a temporary tar, flushed to disk, indexed, then renamed.

    The index is written before the rename, so a ``.tar`` under its real name always has its ``.idx``: a crash at
    any moment leaves either a finished shard or a temporary file that a resumed ingest overwrites.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, mtime=0.0) as sink:  # no wall-clock time: the same files give the same bytes
            for sample in samples:
                sink.write(sample)
        stream.flush()
        os.fsync(stream.fileno())
    index = scan_tar(tmp)
    index.path = final
    write_index(index, index_path_for(final))
    os.replace(tmp, final)
    return index


def iter_members(index: ShardIndex) -> Iterator[tuple[SampleEntry, dict[str, bytes]]]:
    """Read every sample of a shard in file order (for verification and feature extraction)."""
    with open(index.path, "rb") as f:
        for entry in index.samples:
            data = {}
            for ext, comp in entry.components.items():
                f.seek(comp.offset)
                data[ext] = f.read(comp.size)
            yield entry, data
