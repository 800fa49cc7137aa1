"""Cut video files into clip shards with ffmpeg (``ssltrain shards video``), with the resumable shard writer.

Each file is probed, decoded once at the target fps with its short side scaled to ``short_side`` (both sides even,
as H.264's yuv420p needs), and cut into consecutive clips of ``T = round(clip_seconds * fps)`` frames; each clip is
re-encoded on its own (libx264, or mpeg4 where this ffmpeg has no libx264) with the index in front
(``+faststart``), so it decodes from a pipe without seeking. A sample is ``<key>.mp4`` + ``<key>.json`` (source,
start_s, fps, frames, width, height) + ``<key>.cls`` when the file sits in a class folder. A file ffmpeg cannot
probe or decode is skipped and reported, never fatal. The last clip keeps a remainder of at least half a clip
(a video shorter than one clip becomes one short clip); shorter remainders are dropped.

How many clips a file gives is known only once it is decoded, so the clips of each file are first encoded into a
staging folder (``OUT/.<prefix>-clips/``, one small tar per file, by ``workers`` processes); the shards are then
planned from the clips' exact sizes and written by :mod:`ssltrain.data.ingest.writer`, as for images. Both steps
resume: a rerun re-encodes only the files not staged yet and rewrites only unfinished shards. The plan is kept in
the plan record, so the staging folder can go once every shard is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from ssltrain.data.ingest.writer import (
    TAR_MEMBER_OVERHEAD,
    PlannedShard,
    PlanRecord,
    ShardSize,
    Unit,
    finished,
    ordered_map,
    plan_shards,
    write_planned,
)
from ssltrain.data.shards import DataError, iter_members, read_index, write_shard
from ssltrain.data.video_io import FFmpegError, ffmpeg_args, first_line, probe, require_ffmpeg, run, video_encoder

VIDEO_FILE_EXTS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv", "wmv", "ogv", "3gp")
ENCODE_TIMEOUT_S = 120.0  # one clip of a few seconds


@dataclass
class VideoIngestReport:
    """What ``write_video_shards`` wrote and what it skipped (with ffmpeg's reason)."""

    shards: list[Path]
    videos: int  # input files that gave at least one clip
    clips: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # label i is classes[i]; empty when no file was in a class folder
    encoder: str = ""

    def summary(self) -> str:
        text = (
            f"{self.clips} clips from {self.videos} videos in {len(self.shards)} shards ({self.encoder}"
            f"{f', {len(self.classes)} classes' if self.classes else ''}); {len(self.skipped)} videos skipped"
        )
        return text + "".join(f"\n  skipped '{path}': {reason}" for path, reason in self.skipped)


@dataclass(frozen=True)
class ClipSettings:
    fps: float
    short_side: int
    clip_frames: int
    threads: int  # ffmpeg threads: 0 (ffmpeg's choice) for one worker, 1 when several share the cores


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _find_videos(inputs: list[Path]) -> tuple[list[tuple[Path, str, str | None]], list[str]]:
    """(path, source, class name or None) of every input video in key order, and the sorted class names.

    A folder is searched recursively for files with a video extension; a file in a subfolder of an input folder is
    labelled by that subfolder's name (the ImageFolder layout), one directly in it is unlabelled. Files given by
    name are taken whatever their extension and are unlabelled.
    """
    found: list[tuple[Path, str, str | None]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_file():
            found.append((item, item.name, None))
        elif item.is_dir():
            videos = sorted(
                (
                    p
                    for p in item.rglob("*")
                    if p.suffix[1:].lower() in VIDEO_FILE_EXTS and p.is_file() and _visible(p, item)
                ),
                key=lambda p: p.relative_to(item).parts,
            )
            if not videos:
                warnings.warn(f"'{item}' holds no video files ({', '.join(VIDEO_FILE_EXTS)})", stacklevel=3)
            for p in videos:
                rel = p.relative_to(item)
                found.append((p, str(rel), rel.parts[0] if len(rel.parts) > 1 else None))
        else:
            raise DataError(f"video input '{item}' does not exist; pass video files or folders that hold them")
    classes = sorted({name for _, _, name in found if name is not None})
    return found, classes


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` and the aspect kept, both even."""
    if width <= height:
        return _even(short_side), _even(height * short_side / width)
    return _even(width * short_side / height), _even(short_side)


def _encode(frames: np.ndarray, fps: float, encoder: str, threads: int, out: Path) -> bytes:
    """One clip's frames as an mp4 (index first: it decodes from a pipe)."""
    count, height, width, _ = frames.shape
    codec: dict[str, Any] = (
        {"vcodec": "libx264", "preset": "veryfast", "crf": 23}
        if encoder == "libx264"
        else {"vcodec": "mpeg4", "q:v": 4}
    )
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps).output(
        str(out), pix_fmt="yuv420p", movflags="+faststart", an=None, threads=threads, g=count, **codec
    )
    run(ffmpeg_args(stream.overwrite_output()), ENCODE_TIMEOUT_S, frames.tobytes())
    return out.read_bytes()


def _decoded_chunks(
    path: Path, settings: ClipSettings, duration: float | None, size: tuple[int, int]
) -> Iterator[np.ndarray]:
    """The file's frames at the target fps and size, ``clip_frames`` at a time, decoded in one streaming pass.

    ffmpeg writes into a pipe we read clip by clip (memory: one clip), its stderr into a file (a pipe nobody
    reads would fill and stall it); a watchdog kills it past a deadline proportional to the video's length.
    """
    width, height = size
    frame_bytes = width * height * 3
    stream = (
        ffmpeg.input(f"file:{path}", threads=settings.threads)
        .filter("fps", fps=settings.fps)
        .filter("scale", width, height)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None)
    )
    timeout = 120.0 + 4.0 * (duration if duration is not None else 3600.0)
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            ["ffmpeg", "-nostdin", *ffmpeg_args(stream)[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            while chunk := proc.stdout.read(frame_bytes * settings.clip_frames):
                whole = len(chunk) // frame_bytes
                if whole:
                    yield np.frombuffer(chunk[: whole * frame_bytes], dtype=np.uint8).reshape(whole, height, width, 3)
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # the reader stopped early
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if expired.is_set() and returncode != 0:
            raise FFmpegError(f"decoding timed out after {timeout:g}s")
        if returncode != 0:
            stderr.seek(0)
            raise FFmpegError(first_line(stderr.read(), returncode))


def _clips(unit: Unit, source: str, settings: ClipSettings) -> list[dict] | str:
    """The clip samples of one video file, or the reason it has none."""
    try:
        if unit.path.stat().st_size == 0:
            return "empty file (0 bytes)"
        info = probe(unit.path)
        size = scaled_size(info.width, info.height, settings.short_side)
        encoder = video_encoder()
        samples: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="ssltrain-video-") as tmp:
            for i, frames in enumerate(_decoded_chunks(unit.path, settings, info.duration, size)):
                if samples and 2 * len(frames) < settings.clip_frames:
                    continue  # a remainder under half a clip (only the last chunk can be short)
                meta = {
                    "source": source,
                    "clip": i,
                    "start_s": round(i * settings.clip_frames / settings.fps, 6),
                    "fps": float(settings.fps),
                    "frames": len(frames),
                    "width": size[0],
                    "height": size[1],
                }
                data = _encode(frames, settings.fps, encoder, settings.threads, Path(tmp) / "clip.mp4")
                sample: dict[str, Any] = {
                    "__key__": f"{unit.position:06d}_{i:05d}",
                    "mp4": data,
                    "json": json.dumps(meta).encode(),
                }
                if unit.label is not None:
                    sample["cls"] = unit.label
                samples.append(sample)
        return samples or "ffmpeg decoded no frames"
    except (FFmpegError, OSError, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__


# --- staging: each file's clips, encoded once ------------------------------------------------------------------------


def _staged(staging: Path, unit: Unit) -> tuple[Path, Path]:
    return staging / f"{unit.position:06d}.tar", staging / f"{unit.position:06d}.skip"


def _stage_one(staging: Path, settings: ClipSettings, job: tuple[Unit, str]) -> None:
    """Encode one file's clips into the staging folder (atomically), or record why it has none."""
    unit, source = job
    clips, skip = _staged(staging, unit)
    got = _clips(unit, source, settings)
    if isinstance(got, str):
        tmp = skip.with_name(skip.name + ".tmp")
        tmp.write_text(got)
        tmp.replace(skip)
    else:
        write_shard(got, clips)


def _staged_samples(staging: Path, unit: Unit) -> list[dict] | str:
    """A staged file's clip samples (the writer's renderer), or why it has none."""
    clips, skip = _staged(staging, unit)
    if skip.is_file():
        return skip.read_text()
    return [{"__key__": entry.key, **data} for entry, data in iter_members(read_index(clips))]


def _staged_sizes(staging: Path, unit: Unit) -> list[int] | str:
    """The planned bytes of each staged clip sample, or why the file has none."""
    clips, skip = _staged(staging, unit)
    if skip.is_file():
        return skip.read_text()
    return [sum(c.size + TAR_MEMBER_OVERHEAD for c in entry.components.values()) for entry in read_index(clips).samples]


def _is_staged(staging: Path, unit: Unit) -> bool:
    clips, skip = _staged(staging, unit)
    return skip.is_file() or (clips.is_file() and clips.with_suffix(".idx").is_file())


def _stage(staging: Path, settings: ClipSettings, jobs: list[tuple[Unit, str]], workers: int) -> None:
    """Encode the files not staged yet, ``workers`` at a time."""
    todo = [job for job in jobs if not _is_staged(staging, job[0])]
    for _ in ordered_map(partial(_stage_one, staging, settings), todo, workers):
        pass


def _plan_staged(
    units: list[Unit], staging: Path, out_dir: Path, prefix: str, size: ShardSize
) -> tuple[list[PlannedShard], list[tuple[Path, str]]]:
    """The shards of every staged clip, from their exact sizes, and the files that gave none (warned about)."""
    outcomes = [_staged_sizes(staging, unit) for unit in units]
    skipped = [(unit.path, got) for unit, got in zip(units, outcomes) if isinstance(got, str)]
    for path, reason in skipped:
        warnings.warn(f"skipping video '{path}': {reason}", stacklevel=3)
    good = [(unit, got) for unit, got in zip(units, outcomes) if not isinstance(got, str)]
    return plan_shards([u for u, _ in good], [s for _, s in good], out_dir, prefix, size), skipped


def _fingerprint(found: list[tuple[Path, str, str | None]], settings: ClipSettings, size: ShardSize) -> str:
    digest = hashlib.sha256(
        f"{settings.fps}|{settings.short_side}|{settings.clip_frames}|{size.samples}|{size.bytes}\n".encode()
    )
    for path, source, name in found:
        try:
            nbytes = path.stat().st_size
        except OSError:
            nbytes = -1
        digest.update(f"{source}\t{nbytes}\t{name}\n".encode())
    return digest.hexdigest()


def write_video_shards(
    inputs: list[Path],
    out_dir: Path,
    prefix: str = "train",
    fps: float = 8.0,
    short_side: int = 128,
    clip_seconds: float = 4.0,
    shard_samples: int = 1000,
    workers: int = 1,
    max_shard_bytes: int = 1 << 30,
) -> VideoIngestReport:
    """Cut video files (or folders of them; class subfolders give labels) into clip shards in ``out_dir``.

    Keys are ``<file position:06d>_<clip:05d>``, the position counting all input files in sorted order, so the
    same inputs always give the same keys. Files are encoded by ``workers`` processes; shards hold clips in input
    order. Raises ``DataError`` when no file gives a clip (nothing is left behind then).
    """
    require_ffmpeg()
    if fps <= 0 or clip_seconds <= 0 or short_side < 2 or shard_samples < 1:
        raise DataError(
            f"need fps > 0, clip_seconds > 0, short_side >= 2, shard_samples >= 1; got fps={fps}, "
            f"clip_seconds={clip_seconds}, short_side={short_side}, shard_samples={shard_samples}"
        )
    found, classes = _find_videos(inputs)
    if not found:
        raise DataError(f"no video files in {', '.join(map(str, inputs))}")
    out_dir = Path(out_dir)
    settings = ClipSettings(fps, short_side, max(1, round(clip_seconds * fps)), 0 if workers <= 1 else 1)
    size = ShardSize(samples=shard_samples, bytes=max_shard_bytes)
    units = [
        Unit(i, path, classes.index(name) if name is not None else None) for i, (path, _, name) in enumerate(found)
    ]
    jobs = [(unit, source) for unit, (_, source, _) in zip(units, found)]
    created = not out_dir.exists()
    record = PlanRecord(out_dir, prefix)
    changed = "different video files or settings (the inputs, their sizes, fps, short side, clip length or shard size)"
    state = record.claim(_fingerprint(found, settings, size), changed)
    staging = out_dir / f".{prefix}-clips"
    staging.mkdir(exist_ok=True)
    if "plan" not in state:
        _stage(staging, settings, jobs, workers)
        plans, skipped = _plan_staged(units, staging, out_dir, prefix, size)
        if not plans:  # leave nothing behind
            shutil.rmtree(staging)
            record.path.unlink()
            if created:
                out_dir.rmdir()
            raise DataError(
                f"none of the {len(found)} video files gave a clip (first: '{skipped[0][0]}': {skipped[0][1]}); "
                "check that ffmpeg can read them"
            )
        state.update(
            plan=[[p.path.name, [[u.position, a, b] for u, a, b in p.parts]] for p in plans],
            skipped=[[str(path), reason] for path, reason in skipped],
        )
        record.write(state)
    plans = [PlannedShard(out_dir / name, [(units[pos], a, b) for pos, a, b in parts]) for name, parts in state["plan"]]
    needed = {unit for plan in plans if not finished(plan.path) for unit, _, _ in plan.parts}
    _stage(staging, settings, [job for job in jobs if job[0] in needed], workers)
    written = write_planned(plans, partial(_staged_samples, staging), out_dir, prefix, workers)
    shutil.rmtree(staging, ignore_errors=True)
    clips = sum(b - a for plan in plans for _, a, b in plan.parts)
    videos = len({unit for plan in plans for unit, _, _ in plan.parts})
    return VideoIngestReport(
        written.shards, videos, clips, [(Path(p), r) for p, r in state["skipped"]], classes, video_encoder()
    )
