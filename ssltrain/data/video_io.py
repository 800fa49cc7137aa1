"""ffmpeg for video ingest, training and ``shards verify``: probe, decode a clip held in memory, pick the encoder.

ffmpeg-python builds the command lines; they run under ``subprocess`` with timeouts (``ffmpeg.probe`` and
``ffmpeg.run`` have none, and a stuck ffmpeg must not hang an ingest or a DataLoader worker).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from ssltrain.data.shards import DataError
from ssltrain.data.signals import blocked

PROBE_TIMEOUT_S = 60.0
DECODE_TIMEOUT_S = 30.0  # one training clip; a DataLoader worker never waits longer on ffmpeg


class FFmpegError(RuntimeError):
    """ffmpeg or ffprobe failed on one input; the message is the first line of what it said."""


def require_ffmpeg() -> None:
    """Fail early, with the fix, when the ffmpeg binaries are missing (ffmpeg-python only wraps them)."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise DataError(
            f"{' and '.join(missing)} not found on PATH; video needs the ffmpeg binaries "
            "(Debian/Ubuntu: apt-get install ffmpeg; or run tests/video_setup.sh)"
        )


_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\] ")  # "[mov,mp4,... @ 0x55d...] ": a pointer, not news


def first_line(stderr: bytes, returncode: int) -> str:
    """What ffmpeg said first, without its "[demuxer @ 0x...]" context."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return _CONTEXT.sub("", lines[0]) if lines else f"exit code {returncode}"


def run(args: list[str], timeout: float, data: bytes | None = None) -> bytes:
    """Run one ffmpeg/ffprobe command; its stdout, or ``FFmpegError`` (killed on timeout).

    It starts with the scheduler's signals blocked: they are meant for the training run, and a decoder they
    killed would turn a good clip into a skipped one (``ssltrain.data.signals``).
    """
    stdin = subprocess.PIPE if data is not None else subprocess.DEVNULL
    with blocked():
        proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with proc:
        try:
            stdout, stderr = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise FFmpegError(f"{args[0]} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        raise FFmpegError(first_line(stderr, proc.returncode))
    return stdout


def ffmpeg_args(stream: Any) -> list[str]:
    """The quiet ffmpeg command line of an ffmpeg-python output stream."""
    return ["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "error", *ffmpeg.get_args(stream)]


@lru_cache(maxsize=1)
def video_encoder() -> str:
    """libx264 when this ffmpeg has it (Debian's does), else the built-in mpeg4 encoder."""
    listing = run(["ffmpeg", "-hide_banner", "-encoders"], PROBE_TIMEOUT_S).decode(errors="replace")
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
    entries = (
        "stream=width,height,avg_frame_rate,r_frame_rate,nb_frames,duration:stream_side_data=rotation:"
        "stream_tags=rotate:format=duration"
    )
    target = "pipe:" if isinstance(source, bytes) else f"file:{source}"  # file: so "a:b.mp4" is no protocol
    out = run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", entries, "-of", "json", target],
        PROBE_TIMEOUT_S,
        source if isinstance(source, bytes) else None,
    )
    info = json.loads(out or b"{}")
    if not info.get("streams"):
        raise FFmpegError("no video stream")
    stream = info["streams"][0]
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width < 1 or height < 1:
        raise FFmpegError("the video stream has no frame size")
    rotation = stream.get("tags", {}).get("rotate") or next(
        (d["rotation"] for d in stream.get("side_data_list", []) if "rotation" in d), 0
    )
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


def decode_clip(
    data: bytes, width: int, height: int, max_frames: int | None = None, timeout: float = DECODE_TIMEOUT_S
) -> np.ndarray:
    """Frames [N, H, W, 3] uint8 of an encoded clip held in memory; stops after ``max_frames`` when given."""
    options: dict[str, Any] = {
        "format": "rawvideo",
        "pix_fmt": "rgb24",
        "s": f"{width}x{height}",
        "an": None,
        "sn": None,
    }
    if max_frames is not None:
        options["frames:v"] = max_frames
    stream = ffmpeg.input("pipe:", threads=1).output("pipe:", **options)
    out = run(ffmpeg_args(stream), timeout, data)
    frame_bytes = width * height * 3
    if not out:
        raise FFmpegError("no frames decoded")
    if len(out) % frame_bytes:
        raise FFmpegError(f"decoded {len(out)} bytes, not a whole number of {width}x{height} frames")
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, height, width, 3)
