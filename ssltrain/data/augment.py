"""The multi-crop AugmentSpec rendered on the CPU with torchvision.transforms.v2.

The spec is data (:class:`ssltrain.config.AugmentConfig`); this module turns it into one renderer per view.
The DALI renderer renders the same spec on the GPU with the same semantics, so a recipe means the same thing on
either path. Every random draw comes from torch's global generator, which the dataset seeds per sample: the
augmentations of a sample are then a function of (seed, sample position) alone, whatever the worker count.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from ssltrain.config import AugmentConfig, CropConfig


def _blur_kernel(size: int) -> int:
    """About 10% of the crop side, odd (23 px at 224, as in SimCLR/BYOL)."""
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


def _per_view(values: list[float], view: int) -> float:
    return values[min(view, len(values) - 1)]


class ViewRenderer:
    """One view of a crop group: random resized crop, flip, colour jitter (random order), grayscale, blur, solarize.

    Parameters are drawn with torchvision's own samplers (``RandomResizedCrop.get_params``,
    ``ColorJitter.get_params``) and applied with ``transforms.v2.functional`` kernels: the semantics of the v2
    transforms at a fifth of their per-call overhead, which dominates at small image sizes (3 ms vs 0.5 ms a view
    at 32 px). Augmentations with probability 0 are never drawn.
    """

    def __init__(self, crop: CropConfig, view: int, mean: list[float], std: list[float]) -> None:
        self.size = [crop.size, crop.size]
        self.scale, self.ratio = tuple(crop.scale), tuple(crop.ratio)
        self.flip_p, self.jitter_p, self.grayscale_p = crop.flip_p, crop.jitter_p, crop.grayscale_p
        jitter = T.ColorJitter(crop.brightness, crop.contrast, crop.saturation, crop.hue)
        self.jitter_ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        if not any((crop.brightness, crop.contrast, crop.saturation, crop.hue)):
            self.jitter_p = 0.0
        self.blur_p, self.blur_sigma, self.blur_kernel = _per_view(crop.blur_p, view), tuple(crop.blur_sigma), _blur_kernel(crop.size)
        self.solarize_p = _per_view(crop.solarize_p, view)
        self.mean, self.std = mean, std

    @staticmethod
    def _coin(p: float) -> bool:
        return p > 0 and bool(torch.rand(1) < p)

    def __call__(self, image: Tensor) -> Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        x = F.resized_crop(image, top, left, h, w, self.size, antialias=True)
        if self._coin(self.flip_p):
            x = F.horizontal_flip(x)
        if self._coin(self.jitter_p):
            order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(*self.jitter_ranges)
            for op in order.tolist():
                if op == 0 and brightness is not None:
                    x = F.adjust_brightness(x, brightness)
                elif op == 1 and contrast is not None:
                    x = F.adjust_contrast(x, contrast)
                elif op == 2 and saturation is not None:
                    x = F.adjust_saturation(x, saturation)
                elif op == 3 and hue is not None:
                    x = F.adjust_hue(x, hue)
        if self._coin(self.grayscale_p):
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if self._coin(self.blur_p):
            sigma = float(torch.empty(1).uniform_(*self.blur_sigma))
            x = F.gaussian_blur(x, [self.blur_kernel, self.blur_kernel], [sigma, sigma])
        if self._coin(self.solarize_p):
            x = F.solarize(x, 128)  # on uint8, before the float conversion
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


class CPURenderer:
    """Renders all global and local views of one decoded image (uint8 tensor [3, H, W])."""

    def __init__(self, spec: AugmentConfig) -> None:
        self.spec = spec
        self.global_views = [ViewRenderer(spec.global_crops, i, spec.mean, spec.std) for i in range(spec.global_crops.count)]
        self.local_views = [ViewRenderer(spec.local_crops, i, spec.mean, spec.std) for i in range(spec.local_crops.count)]

    def __call__(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return [t(image) for t in self.global_views], [t(image) for t in self.local_views]


class EvalTransform:
    """Deterministic view for probes: resize the short side, centre crop, normalise."""

    def __init__(self, size: int, mean: list[float], std: list[float], crop_fraction: float = 1.0) -> None:
        self.size, self.resize = size, int(round(size / crop_fraction))
        self.mean, self.std = mean, std

    def __call__(self, image: Tensor) -> Tensor:
        x = F.center_crop(F.resize(image, [self.resize], antialias=True), [self.size, self.size])
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
