"""The training input pipeline: from the rank's slice of the global sample stream to batches of ``Views``.

One seam for the three renderers of the same sample stream (``GlobalBatchSampler``): the CPU image path
(DataLoader workers, torchvision), the DALI image path (``data.loader=dali``) and the video path
(``data.modality=video``). Each takes the sampler as given, so the exact, elastic resume property holds for all.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ssltrain.config import Config, ConfigError
from ssltrain.data.augment import CPURenderer
from ssltrain.data.loaders.cpu import AugmentedShards, Views, make_loader
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog


def build_train_loader(
    cfg: Config, catalog: ShardCatalog, sampler: GlobalBatchSampler, device: torch.device
) -> Iterable[Views]:
    """An iterable of this rank's batches, one per item of ``sampler``, in order."""
    if cfg.data.modality == "image" and catalog.video_samples:
        raise ConfigError(f"'{cfg.data.train}' holds {catalog.video_samples} video clips; train on them with "
                          f"data.modality=video (and data.video.mode=frames for an image backbone)")
    if cfg.data.modality == "video":
        from ssltrain.data.loaders.video import build_video_loader

        return build_video_loader(cfg, catalog, sampler, device)
    if cfg.data.loader == "dali":
        from ssltrain.data.loaders.dali import build_dali_loader

        return build_dali_loader(cfg, catalog, sampler, device)
    return build_cpu_loader(cfg, catalog, sampler, device)


def build_cpu_loader(
    cfg: Config, catalog: ShardCatalog, sampler: GlobalBatchSampler, device: torch.device
) -> Iterable[Views]:
    """The CPU image path (DataLoader workers, torchvision); also what ``data.loader=dali`` falls back to."""
    dataset = AugmentedShards(catalog, CPURenderer(cfg.augment), cfg.seed)
    return make_loader(dataset, cfg.data.workers, pin_memory=device.type == "cuda", batch_sampler=sampler)
