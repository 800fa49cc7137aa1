"""The training input pipeline: from the rank's slice of the global sample stream to batches of ``Views``.

One seam for the three renderers of the same sample stream (``GlobalBatchSampler``): the CPU image path
(``cpu``: DataLoader workers, torchvision), the DALI image path (``dali``: ``data.loader=dali``) and the video
path (``video``: ``data.modality=video``). All three plug into the one seeded dataset (``dataset``) and take the
sampler as given, so the exact, elastic resume property holds for all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ssltrain.config import Config, ConfigError
from ssltrain.data.loaders.cpu import build_cpu_loader
from ssltrain.data.loaders.dataset import BatchMasks, Views
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog


def build_train_loader(
    cfg: Config,
    catalog: ShardCatalog,
    sampler: GlobalBatchSampler,
    device: torch.device,
    masks: BatchMasks | None = None,
) -> Iterable[Views]:
    """An iterable of this rank's batches, one per item of ``sampler``, in order; with ``masks`` (a masked method's
    :class:`ssltrain.data.masks.MaskDraw`), each batch's masks are drawn in the loader's workers."""
    if cfg.data.modality == "image" and (clips := catalog.video_samples()):
        raise ConfigError(
            f"'{cfg.data.train}' holds {clips} video clips; train on them with "
            f"data.modality=video (and data.video.mode=frames for an image backbone)"
        )
    if catalog.remote:  # the shards of the batches ahead are downloaded into the cache while these are read
        sampler = sampler.with_prefetch(catalog.prefetch, ahead=2 * max(1, cfg.data.workers) + 2)
    if cfg.data.modality == "video":
        from ssltrain.data.loaders.video import build_video_loader  # imports ffmpeg-python: only when asked for

        return build_video_loader(cfg, catalog, sampler, device, masks)
    if cfg.data.loader == "dali":
        from ssltrain.data.loaders.dali import build_dali_loader

        return build_dali_loader(cfg, catalog, sampler, device, masks)
    return build_cpu_loader(cfg, catalog, sampler, device, masks)


__all__ = ["Views", "build_train_loader"]
