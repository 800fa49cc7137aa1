"""The video renderer (``data.modality=video``): two views of a clip sample, cut at a random gap in time.

A clip sample (written by ``ssltrain shards video``) gives two views at a random gap of ``[0,
data.video.max_gap_s]`` seconds: two clips of ``data.video.frames`` frames ([3, T, H, W], for a video backbone) or
two frames ([3, H, W], for an image backbone). The spatial ``ViewParams`` are drawn once per view and applied to
all its frames alike, and every draw, temporal and spatial, happens inside the seeded dataset, as for images:
resume stays exact. Decoding runs ffmpeg on the clip bytes through a pipe, stops after the last frame a view needs,
and is killed after ``DECODE_TIMEOUT_S``; a clip that fails is skipped and reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ssltrain.config import Config, check_video_config
from ssltrain.data.augment import CPURenderer, SampleRandom, ViewParams, ViewSpec, apply
from ssltrain.data.loaders.dataset import (
    BatchMasks,
    collate_for,
    Sample,
    SeededSamples,
    Unreadable,
    Views,
    collate_views,
    make_loader,
)
from ssltrain.data.stream import GlobalBatchSampler, RawSample, ShardCatalog
from ssltrain.data.video_io import DECODE_TIMEOUT_S, FFmpegError, decode_clip, probe, require_ffmpeg


@dataclass(frozen=True)
class ClipInfo:
    fps: float
    frames: int | None  # None: unknown until decoded
    width: int
    height: int


class ClipMetadata:
    """Each catalog sample's ``.json`` (fps, frames, size) by sample id; samples without one are probed instead."""

    def __init__(self, catalog: ShardCatalog) -> None:
        self.catalog = catalog  # each sample's .json is read beside its clip, from the same shard

    def info(self, i: int, clip: bytes) -> ClipInfo:
        raw = self.catalog.read_meta(i)
        if raw is not None:
            try:
                meta = json.loads(raw)
                fps, frames, width, height = (
                    float(meta["fps"]),
                    int(meta["frames"]),
                    int(meta["width"]),
                    int(meta["height"]),
                )
                if fps > 0 and frames > 0 and width > 0 and height > 0:
                    return ClipInfo(fps, frames, width, height)
            except (ValueError, KeyError, TypeError):
                pass  # not our metadata: ask ffprobe
        video = probe(clip)
        if video.fps <= 0:
            raise FFmpegError("the clip has no frame rate")
        return ClipInfo(video.fps, video.frames, video.width, video.height)


def draw_windows(frames: int, fps: float, length: int, max_gap_s: float, rng: SampleRandom) -> list[list[int]]:
    """Frame indices of two views of ``length`` frames whose starts lie a random ``[0, max_gap_s]`` apart.

    The gap (whole frames, at most what the clip allows) is drawn first, then the earlier start, then which view
    is the earlier one, all from the sample's ``rng``. A clip shorter than ``length`` repeats its last frame.
    """
    span = max(0, frames - length)  # the latest start of a whole window
    max_gap = min(span, math.floor(max_gap_s * fps + 1e-6))
    gap = rng.integer(0, max_gap + 1)
    first = rng.integer(0, span - gap + 1)
    starts = [first, first + gap]
    if rng.coin(0.5):
        starts.reverse()
    return [[min(s + k, frames - 1) for k in range(length)] for s in starts]


class ClipViews:
    """The video renderer of the seeded dataset: draw the two windows, decode what they need, draw and apply the
    views. Global view ``i`` and local view ``j`` are cut at time ``i % 2`` / ``j % 2`` of the two windows."""

    def __init__(self, cfg: Config, metadata: ClipMetadata) -> None:
        self.metadata = metadata
        self.clips = cfg.data.video.mode == "clips"
        self.length = cfg.data.video.frames if self.clips else 1
        self.max_gap_s = cfg.data.video.max_gap_s
        self.renderer = CPURenderer(cfg.augment)

    def __call__(self, raw: RawSample, sample_id: int, position: int, rng: SampleRandom) -> Sample:
        assert raw.image is not None  # the dataset skips samples without one
        try:
            return self._render(raw.image, sample_id, raw.label, position, rng)
        except FFmpegError as err:
            raise Unreadable(f"cannot decode clip ({err})") from None

    def _render(self, data: bytes, sample_id: int, label: int | None, position: int, rng: SampleRandom) -> Sample:
        info = self.metadata.info(sample_id, data)
        decoded = None
        frames = info.frames
        if frames is None:
            decoded = decode_clip(data, info.width, info.height, timeout=DECODE_TIMEOUT_S)
            frames = len(decoded)
        windows = draw_windows(frames, info.fps, self.length, self.max_gap_s, rng)
        if decoded is None:
            last_needed = max(max(w) for w in windows)
            decoded = decode_clip(data, info.width, info.height, last_needed + 1, timeout=DECODE_TIMEOUT_S)
        clip = torch.from_numpy(decoded.copy())  # [N, H, W, 3]
        last = len(decoded) - 1  # fewer frames than the metadata promised: repeat the last one
        windows = [[min(k, last) for k in w] for w in windows]
        params = self.renderer.draw(clip.shape[1], clip.shape[2], rng)
        n_global = len(self.renderer.global_views)
        views = [
            self._view(clip, windows[i % 2], p, v)
            for i, (p, v) in enumerate(zip(params[:n_global], self.renderer.global_views))
        ]
        views += [
            self._view(clip, windows[j % 2], p, v)
            for j, (p, v) in enumerate(zip(params[n_global:], self.renderer.local_views))
        ]
        return Sample(views[:n_global], views[n_global:], sample_id, label, position)

    def _view(self, clip: Tensor, frames: list[int], params: ViewParams, view: ViewSpec) -> Tensor:
        """The same parameters on every frame of the window: [3, T, h, w] for clips, [3, h, w] for frames."""
        x = apply(clip[frames].permute(0, 3, 1, 2), params, view, self.renderer.mean, self.renderer.std)
        return x.permute(1, 0, 2, 3).contiguous() if self.clips else x[0]


class VideoClips(SeededSamples[Sample]):
    """The seeded dataset with the video renderer; the sampler hands it ``(sample_id, position)`` pairs."""

    def __init__(self, catalog: ShardCatalog, cfg: Config) -> None:
        super().__init__(catalog, ClipViews(cfg, ClipMetadata(catalog)), cfg.seed)


def build_video_loader(
    cfg: Config,
    catalog: ShardCatalog,
    sampler: GlobalBatchSampler,
    device: torch.device,
    masks: BatchMasks | None = None,
) -> Iterable[Views]:
    """This rank's batches of two-view clips (or frames), one per item of ``sampler``, decoded in DataLoader workers."""
    check_video_config(cfg)
    require_ffmpeg()
    return make_loader(
        VideoClips(catalog, cfg),
        cfg.data.workers,
        pin_memory=device.type == "cuda",
        batch_sampler=sampler,
        collate=collate_for(masks),
    )
