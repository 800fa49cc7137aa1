"""Video: cut video files into clip shards with ffmpeg (``ssltrain shards video``), and render two views of a clip.

Ingest: each file is probed, decoded once at the target fps with its short side scaled to ``short_side`` (both
sides even, as H.264's yuv420p needs), and cut into consecutive clips of ``T = round(clip_seconds * fps)`` frames;
each clip is re-encoded on its own (libx264, or mpeg4 where this ffmpeg has no libx264) with the index in front
(``+faststart``), so it decodes from a pipe without seeking. A sample is ``<key>.mp4`` + ``<key>.json`` (source,
start_s, fps, frames, width, height) + ``<key>.cls`` when the file sits in a class folder. A file ffmpeg cannot
probe or decode is skipped and reported, never fatal. The last clip keeps a remainder of at least half a clip
(a video shorter than one clip becomes one short clip); shorter remainders are dropped.

Training (``data.modality=video``): a clip sample gives two views at a random gap of ``[0, data.video.max_gap_s]``
seconds: two clips of ``data.video.frames`` frames ([3, T, H, W], for a video backbone) or two frames ([3, H, W],
for an image backbone). The spatial AugmentSpec is drawn once per view and applied to all its frames alike (the
renderers take a [T, 3, H, W] batch), and every draw, temporal and spatial, is seeded by the sample's global
position, as for images: resume stays exact. Decoding runs ffmpeg on the clip bytes through a pipe, stops after
the last frame a view needs, and is killed after ``DECODE_TIMEOUT_S``; a clip that fails is skipped and reported.

ffmpeg-python builds the command lines; they run under ``subprocess`` with timeouts (``ffmpeg.probe`` and
``ffmpeg.run`` have none, and a stuck ffmpeg must not hang an ingest or a DataLoader worker).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ffmpeg
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssltrain.config import Config, ConfigError
from ssltrain.data.augment import CPURenderer, ViewRenderer
from ssltrain.data.loaders.cpu import Sample, Skipped, Views, make_loader
from ssltrain.data.shards import DataError, read_index, write_shards
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog, sample_seed
from ssltrain.models.backbones import VIDEO_BACKBONES

VIDEO_FILE_EXTS = ("mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv", "wmv", "ogv", "3gp")
PROBE_TIMEOUT_S = 60.0
ENCODE_TIMEOUT_S = 120.0  # one clip of a few seconds
DECODE_TIMEOUT_S = 30.0  # one training clip; a DataLoader worker never waits longer on ffmpeg


# --- ffmpeg ----------------------------------------------------------------------------------------------------------


class FFmpegError(RuntimeError):
    """ffmpeg or ffprobe failed on one input; the message is the first line of what it said."""


def require_ffmpeg() -> None:
    """Fail early, with the fix, when the ffmpeg binaries are missing (ffmpeg-python only wraps them)."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found on PATH; video needs the ffmpeg binaries "
                        "(Debian/Ubuntu: apt-get install ffmpeg; or run tests/video_setup.sh)")


_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\] ")  # "[mov,mp4,... @ 0x55d...] ": a pointer, not news


def _first_line(stderr: bytes, returncode: int) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return _CONTEXT.sub("", lines[0]) if lines else f"exit code {returncode}"


def _run(args: list[str], timeout: float, data: bytes | None = None) -> bytes:
    """Run one ffmpeg/ffprobe command; its stdout, or ``FFmpegError`` (killed on timeout)."""
    try:
        done = subprocess.run(args, input=data, capture_output=True, timeout=timeout,
                              stdin=None if data is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FFmpegError(f"{args[0]} timed out after {timeout:g}s") from None
    if done.returncode != 0:
        raise FFmpegError(_first_line(done.stderr, done.returncode))
    return done.stdout


def _ffmpeg_args(stream: ffmpeg.nodes.OutputStream) -> list[str]:
    return ["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "error", *ffmpeg.get_args(stream)]


@lru_cache(maxsize=1)
def video_encoder() -> str:
    """libx264 when this ffmpeg has it (Debian's does), else the built-in mpeg4 encoder."""
    listing = _run(["ffmpeg", "-hide_banner", "-encoders"], PROBE_TIMEOUT_S).decode(errors="replace")
    names = {line.split()[1] for line in listing.splitlines() if len(line.split()) > 1}
    for name in ("libx264", "mpeg4"):
        if name in names:
            return name
    raise DataError("this ffmpeg has neither the libx264 nor the mpeg4 encoder; install Debian's ffmpeg package")


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed (after rotation metadata), which is what ffmpeg decodes to
    height: int
    fps: float
    frames: int | None  # from the container, when it says
    duration: float | None


def _rate(text: str | None) -> float:
    num, _, den = (text or "0/0").partition("/")
    try:
        return float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return 0.0


def probe(source: Path | bytes) -> VideoInfo:
    """The first video stream's geometry and rate, from a file or from bytes (through a pipe)."""
    entries = ("stream=width,height,avg_frame_rate,r_frame_rate,nb_frames,duration:stream_side_data=rotation:"
               "stream_tags=rotate:format=duration")
    target = "pipe:" if isinstance(source, bytes) else f"file:{source}"  # file: so "a:b.mp4" is no protocol
    out = _run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", entries, "-of", "json", target],
               PROBE_TIMEOUT_S, source if isinstance(source, bytes) else None)
    info = json.loads(out or b"{}")
    if not info.get("streams"):
        raise FFmpegError("no video stream")
    stream = info["streams"][0]
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width < 1 or height < 1:
        raise FFmpegError("the video stream has no frame size")
    rotation = stream.get("tags", {}).get("rotate") or next(
        (d["rotation"] for d in stream.get("side_data_list", []) if "rotation" in d), 0)
    if abs(int(float(rotation))) % 180 == 90:
        width, height = height, width
    fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    frames = str(stream.get("nb_frames", ""))
    duration = stream.get("duration") or info.get("format", {}).get("duration")
    try:
        seconds = float(duration) if duration not in (None, "N/A") else None
    except ValueError:
        seconds = None
    return VideoInfo(width, height, fps, int(frames) if frames.isdigit() else None, seconds)


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` and the aspect kept, both even."""
    if width <= height:
        return _even(short_side), _even(height * short_side / width)
    return _even(width * short_side / height), _even(short_side)


def decode_clip(data: bytes, width: int, height: int, max_frames: int | None = None,
                timeout: float | None = None) -> np.ndarray:
    """Frames [N, H, W, 3] uint8 of an encoded clip held in memory; stops after ``max_frames`` when given."""
    options: dict = {"format": "rawvideo", "pix_fmt": "rgb24", "s": f"{width}x{height}", "an": None, "sn": None}
    if max_frames is not None:
        options["frames:v"] = max_frames
    stream = ffmpeg.input("pipe:", threads=1).output("pipe:", **options)
    out = _run(_ffmpeg_args(stream), DECODE_TIMEOUT_S if timeout is None else timeout, data)
    frame_bytes = width * height * 3
    if not out:
        raise FFmpegError("no frames decoded")
    if len(out) % frame_bytes:
        raise FFmpegError(f"decoded {len(out)} bytes, not a whole number of {width}x{height} frames")
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, height, width, 3)


# --- ingest ----------------------------------------------------------------------------------------------------------


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
        text = (f"{self.clips} clips from {self.videos} videos in {len(self.shards)} shards ({self.encoder}"
                f"{f', {len(self.classes)} classes' if self.classes else ''}); {len(self.skipped)} videos skipped")
        return text + "".join(f"\n  skipped '{path}': {reason}" for path, reason in self.skipped)


@dataclass(frozen=True)
class _Job:
    position: int  # the file's place among all inputs: its key prefix, kept when other files are skipped
    path: Path
    source: str  # what the metadata calls it: the path under its input folder, or the file name
    label: int | None
    fps: float
    short_side: int
    clip_frames: int
    threads: int  # ffmpeg threads: 0 (ffmpeg's choice) for one worker, 1 when several share the cores


@dataclass
class _Result:
    job: _Job
    clips: list[tuple[bytes, dict]]
    error: str = ""


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
            videos = sorted((p for p in item.rglob("*") if p.suffix[1:].lower() in VIDEO_FILE_EXTS
                             and p.is_file() and _visible(p, item)), key=lambda p: p.relative_to(item).parts)
            if not videos:
                warnings.warn(f"'{item}' holds no video files ({', '.join(VIDEO_FILE_EXTS)})", stacklevel=3)
            for p in videos:
                rel = p.relative_to(item)
                found.append((p, str(rel), rel.parts[0] if len(rel.parts) > 1 else None))
        else:
            raise DataError(f"video input '{item}' does not exist; pass video files or folders that hold them")
    classes = sorted({name for _, _, name in found if name is not None})
    return found, classes


def _encode(frames: np.ndarray, fps: float, encoder: str, threads: int, out: Path) -> bytes:
    """One clip's frames as an mp4 (index first: it decodes from a pipe)."""
    count, height, width, _ = frames.shape
    codec = ({"vcodec": "libx264", "preset": "veryfast", "crf": 23} if encoder == "libx264"
             else {"vcodec": "mpeg4", "q:v": 4})
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps).output(
        str(out), pix_fmt="yuv420p", movflags="+faststart", an=None, threads=threads, g=count, **codec)
    _run(_ffmpeg_args(stream.overwrite_output()), ENCODE_TIMEOUT_S, frames.tobytes())
    return out.read_bytes()


def _decoded_chunks(job: _Job, info: VideoInfo, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """The file's frames at the target fps and size, ``clip_frames`` at a time, decoded in one streaming pass.

    ffmpeg writes into a pipe we read clip by clip (memory: one clip), its stderr into a file (a pipe nobody
    reads would fill and stall it); a watchdog kills it past a deadline proportional to the video's length.
    """
    width, height = size
    frame_bytes = width * height * 3
    stream = (ffmpeg.input(f"file:{job.path}", threads=job.threads).filter("fps", fps=job.fps)
              .filter("scale", width, height).output("pipe:", format="rawvideo", pix_fmt="rgb24", an=None, sn=None))
    timeout = 120.0 + 4.0 * (info.duration if info.duration is not None else 3600.0)
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(["ffmpeg", "-nostdin", *_ffmpeg_args(stream)[1:]], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)
        expired = threading.Event()
        timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
        timer.start()
        try:
            while chunk := proc.stdout.read(frame_bytes * job.clip_frames):  # type: ignore[union-attr]
                whole = len(chunk) // frame_bytes
                if whole:
                    yield np.frombuffer(chunk[: whole * frame_bytes], dtype=np.uint8).reshape(whole, height, width, 3)
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # the reader stopped early
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        if expired.is_set() and returncode != 0:
            raise FFmpegError(f"decoding timed out after {timeout:g}s")
        if returncode != 0:
            stderr.seek(0)
            raise FFmpegError(_first_line(stderr.read(), returncode))


def _ingest_one(job: _Job) -> _Result:
    """All clips of one video, or the reason it has none; runs in a worker process."""
    try:
        if job.path.stat().st_size == 0:
            return _Result(job, [], "empty file (0 bytes)")
        info = probe(job.path)
        size = scaled_size(info.width, info.height, job.short_side)
        encoder = video_encoder()
        clips: list[tuple[bytes, dict]] = []
        with tempfile.TemporaryDirectory(prefix="ssltrain-video-") as tmp:
            for i, frames in enumerate(_decoded_chunks(job, info, size)):
                if clips and 2 * len(frames) < job.clip_frames:
                    continue  # a remainder under half a clip (only the last chunk can be short)
                meta = {"source": job.source, "clip": i, "start_s": round(i * job.clip_frames / job.fps, 6),
                        "fps": float(job.fps), "frames": int(len(frames)), "width": size[0], "height": size[1]}
                clips.append((_encode(frames, job.fps, encoder, job.threads, Path(tmp) / "clip.mp4"), meta))
        if not clips:
            return _Result(job, [], "ffmpeg decoded no frames")
        return _Result(job, clips)
    except (FFmpegError, OSError, ValueError) as err:
        return _Result(job, [], str(err).splitlines()[0] if str(err) else type(err).__name__)


def _ordered_map(fn: Callable[[_Job], _Result], jobs: list[_Job], workers: int) -> Iterator[_Result]:
    """``map(fn, jobs)`` over ``workers`` processes, in order, with at most ``2 * workers`` results in flight."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        todo = iter(jobs)
        for job in todo:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


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
    progress: Callable[[int], None] | None = None,
) -> VideoIngestReport:
    """Cut video files (or folders of them; class subfolders give labels) into clip shards in ``out_dir``.

    Keys are ``<file position:06d>_<clip:05d>``, the position counting all input files in sorted order, so the
    same inputs always give the same keys. Files are processed by ``workers`` processes, written in input order.
    Raises ``DataError`` when no file gives a clip (nothing is written then).
    """
    require_ffmpeg()
    if fps <= 0 or clip_seconds <= 0 or short_side < 2 or shard_samples < 1:
        raise DataError(f"need fps > 0, clip_seconds > 0, short_side >= 2, shard_samples >= 1; got fps={fps}, "
                        f"clip_seconds={clip_seconds}, short_side={short_side}, shard_samples={shard_samples}")
    found, classes = _find_videos(inputs)
    if not found:
        raise DataError(f"no video files in {', '.join(map(str, inputs))}")
    clip_frames = max(1, round(clip_seconds * fps))
    threads = 0 if workers <= 1 else 1
    jobs = [_Job(i, path, source, classes.index(name) if name is not None else None, fps, short_side, clip_frames,
                 threads) for i, (path, source, name) in enumerate(found)]
    report = VideoIngestReport([], 0, 0, classes=classes, encoder=video_encoder())

    def samples() -> Iterator[dict]:
        for result in _ordered_map(_ingest_one, jobs, workers):
            if result.error:
                report.skipped.append((result.job.path, result.error))
                warnings.warn(f"skipping video '{result.job.path}': {result.error}")
                continue
            report.videos += 1
            for data, meta in result.clips:
                sample = {"__key__": f"{result.job.position:06d}_{meta['clip']:05d}", "mp4": data,
                          "json": json.dumps(meta).encode()}
                if result.job.label is not None:
                    sample["cls"] = result.job.label
                report.clips += 1
                yield sample

    stream = samples()
    first = next(stream, None)  # write_shards would leave an empty shard behind for no samples
    if first is None:
        path, reason = report.skipped[0]
        raise DataError(f"none of the {len(found)} video files gave a clip (first: '{path}': {reason}); "
                        "check that ffmpeg can read them")
    report.shards = write_shards(chain([first], stream), Path(out_dir), prefix, max_count=shard_samples,
                                 max_size=max_shard_bytes, progress=progress)
    return report


# --- training views --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipInfo:
    fps: float
    frames: int | None  # None: unknown until decoded
    width: int
    height: int


class ClipMetadata:
    """Each catalog sample's ``.json`` (fps, frames, size) by sample id; samples without one are probed instead."""

    def __init__(self, catalog: ShardCatalog) -> None:
        self.paths = catalog.paths
        offsets, sizes = [], []
        for path in catalog.paths:  # the catalog indexed the same shards in the same order
            for entry in read_index(path).samples:
                comp = entry.components.get("json")
                offsets.append(comp.offset if comp else -1)
                sizes.append(comp.size if comp else -1)
        if len(offsets) != len(catalog):  # a shard changed since the catalog read it: probe everything
            offsets, sizes = [-1] * len(catalog), [-1] * len(catalog)
        self.shard = catalog.shard
        self.offset = np.asarray(offsets, dtype=np.int64)
        self.size = np.asarray(sizes, dtype=np.int64)

    def info(self, i: int, clip: bytes) -> ClipInfo:
        if self.size[i] >= 0:
            with open(self.paths[int(self.shard[i])], "rb") as f:
                f.seek(int(self.offset[i]))
                raw = f.read(int(self.size[i]))
            try:
                meta = json.loads(raw)
                info = ClipInfo(float(meta["fps"]), int(meta["frames"]), int(meta["width"]), int(meta["height"]))
                if info.fps > 0 and info.frames > 0 and info.width > 0 and info.height > 0:
                    return info
            except (ValueError, KeyError, TypeError):
                pass  # not our metadata: ask ffprobe
        video = probe(clip)
        if video.fps <= 0:
            raise FFmpegError("the clip has no frame rate")
        return ClipInfo(video.fps, video.frames, video.width, video.height)


def draw_windows(frames: int, fps: float, length: int, max_gap_s: float) -> list[list[int]]:
    """Frame indices of two views of ``length`` frames whose starts lie a random ``[0, max_gap_s]`` apart.

    The gap (whole frames, at most what the clip allows) is drawn first, then the earlier start, then which view
    is the earlier one, all from torch's generator (seeded per sample). A clip shorter than ``length`` repeats
    its last frame.
    """
    span = max(0, frames - length)  # the latest start of a whole window
    max_gap = min(span, math.floor(max_gap_s * fps + 1e-6))
    gap = int(torch.randint(0, max_gap + 1, (1,)))
    first = int(torch.randint(0, span - gap + 1, (1,)))
    starts = [first, first + gap]
    if bool(torch.rand(1) < 0.5):
        starts.reverse()
    return [[min(s + k, frames - 1) for k in range(length)] for s in starts]


class VideoClips(Dataset):
    """Map-style dataset of clip samples; the sampler hands it ``(sample_id, position)`` pairs.

    Global view ``i`` and local view ``j`` are cut at time ``i % 2`` / ``j % 2`` of the two drawn windows.
    """

    def __init__(self, catalog: ShardCatalog, cfg: Config) -> None:
        self.catalog, self.seed = catalog, cfg.seed
        self.clips = cfg.data.video.mode == "clips"
        self.length = cfg.data.video.frames if self.clips else 1
        self.max_gap_s = cfg.data.video.max_gap_s
        self.renderer = CPURenderer(cfg.augment)
        self.metadata = ClipMetadata(catalog)

    def __len__(self) -> int:
        return len(self.catalog)

    def _view(self, renderer: ViewRenderer, clip: Tensor, frames: list[int]) -> Tensor:
        x = renderer(clip[frames].permute(0, 3, 1, 2))  # [T, 3, h, w]: one draw of crop/flip/jitter for all T
        return x.permute(1, 0, 2, 3).contiguous() if self.clips else x[0]

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:
        sample_id, position = item
        raw = self.catalog.read(sample_id)
        where = f"{raw.shard}:{raw.key}"
        if raw.image is None:
            return Skipped(where, raw.problem)
        try:
            info = self.metadata.info(sample_id, raw.image)
            # Temporal and spatial draws are a function of (seed, position): independent of workers, resumable.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, position))
                decoded = None
                frames = info.frames
                if frames is None:
                    decoded = decode_clip(raw.image, info.width, info.height)
                    frames = len(decoded)
                windows = draw_windows(frames, info.fps, self.length, self.max_gap_s)
                if decoded is None:
                    decoded = decode_clip(raw.image, info.width, info.height, max(max(w) for w in windows) + 1)
                clip = torch.from_numpy(decoded.copy())
                last = len(decoded) - 1  # fewer frames than the metadata promised: repeat the last one
                windows = [[min(k, last) for k in w] for w in windows]
                global_views = [self._view(r, clip, windows[i % 2]) for i, r in enumerate(self.renderer.global_views)]
                local_views = [self._view(r, clip, windows[j % 2]) for j, r in enumerate(self.renderer.local_views)]
        except FFmpegError as err:
            return Skipped(where, f"cannot decode clip ({err})")
        return Sample(global_views, local_views, sample_id, raw.label)


def check_video_config(cfg: Config) -> None:
    """Clips go to a video backbone, frames to an image backbone: say so before the first batch, not in it."""
    video, backbone = cfg.data.video, cfg.model.backbone
    if video.mode == "clips" and backbone not in VIDEO_BACKBONES:
        raise ConfigError(f"data.video.mode=clips gives [B,3,T,H,W] clips, which {backbone} cannot take; use "
                          f"model.backbone={VIDEO_BACKBONES[0]} or data.video.mode=frames")
    if video.mode == "frames" and backbone in VIDEO_BACKBONES:
        raise ConfigError(f"data.video.mode=frames gives [B,3,H,W] frames, which {backbone} cannot take; use "
                          "data.video.mode=clips or an image backbone (resnet18, vit_small, ...)")
    if video.frames < 1 or video.max_gap_s < 0:
        raise ConfigError(f"data.video.frames must be >= 1 and data.video.max_gap_s >= 0, got {video.frames} and "
                          f"{video.max_gap_s}")


def build_video_loader(
    cfg: Config, catalog: ShardCatalog, sampler: GlobalBatchSampler, device: torch.device
) -> Iterable[Views]:
    """This rank's batches of two-view clips (or frames), one per item of ``sampler``, decoded in DataLoader workers."""
    check_video_config(cfg)
    require_ffmpeg()
    return make_loader(VideoClips(catalog, cfg), cfg.data.workers, pin_memory=device.type == "cuda",
                       batch_sampler=sampler)


__all__ = ["FFmpegError", "VideoClips", "VideoIngestReport", "build_video_loader", "check_video_config",
           "decode_clip", "draw_windows", "probe", "require_ffmpeg", "write_video_shards"]
