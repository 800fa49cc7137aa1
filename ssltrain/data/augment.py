"""The multi-crop AugmentSpec: a view's random parameters are drawn here, once, and every renderer applies them.

The spec is data (:class:`ssltrain.config.AugmentConfig`); :class:`ViewSpec` is one view of it, resolved.
:func:`draw` makes every random choice of a view (crop box, flip, colour-jitter order and strengths, grayscale,
blur sigma, solarize) into a :class:`ViewParams`; the CPU renderer (:func:`apply`, torchvision's v2 kernels), the
DALI graph and the video loader all apply those parameters, so a recipe means the same thing on every path and the
views agree across them. Draws come from torch's global generator, which the seeded dataset seeds per sample: the
views of a sample are a function of (seed, sample position) alone, whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from ssltrain.config import AugmentConfig, CropConfig

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op numbers
NO_JITTER = (1.0, 1.0, 1.0, 0.0)  # the factors of ops that do not run: identities


def _blur_kernel(size: int) -> int:
    """About 10% of the crop side, odd (23 px at 224, as in SimCLR/BYOL)."""
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


def _per_view(values: list[float], view: int) -> float:
    return values[min(view, len(values) - 1)]


Range = tuple[float, float]


def _range(r: Sequence[float] | None) -> Range | None:
    return (r[0], r[1]) if r is not None else None


@dataclass(frozen=True)
class ViewSpec:
    """One view of a crop group, resolved from its config: output size, crop ranges and the probability of each op.

    ``jitter_ranges`` are torchvision's ColorJitter ranges (``None``: that op is off); an augmentation with
    probability 0 is never drawn, so it consumes no random numbers.
    """

    size: int
    scale: Range
    ratio: Range
    flip_p: float
    jitter_p: float
    jitter_ranges: tuple[Range | None, Range | None, Range | None, Range | None]
    grayscale_p: float
    blur_p: float
    blur_sigma: Range
    blur_kernel: int
    solarize_p: float

    @classmethod
    def of(cls, crop: CropConfig, view: int) -> ViewSpec:
        """View ``view`` of the group ``crop`` (``blur_p`` and ``solarize_p`` are per view, the last one repeats)."""
        jitter = T.ColorJitter(crop.brightness, crop.contrast, crop.saturation, crop.hue)
        jitter_on = any((crop.brightness, crop.contrast, crop.saturation, crop.hue))
        return cls(
            size=crop.size,
            scale=(crop.scale[0], crop.scale[1]),
            ratio=(crop.ratio[0], crop.ratio[1]),
            flip_p=crop.flip_p,
            jitter_p=crop.jitter_p if jitter_on else 0.0,
            jitter_ranges=(
                _range(jitter.brightness),
                _range(jitter.contrast),
                _range(jitter.saturation),
                _range(jitter.hue),
            ),
            grayscale_p=crop.grayscale_p,
            blur_p=_per_view(crop.blur_p, view),
            blur_sigma=(crop.blur_sigma[0], crop.blur_sigma[1]),
            blur_kernel=_blur_kernel(crop.size),
            solarize_p=_per_view(crop.solarize_p, view),
        )

    @property
    def jitter_ops(self) -> tuple[int, ...]:
        """The colour-jitter ops this view can apply (none when jitter is off)."""
        if self.jitter_p <= 0:
            return ()
        return tuple(op for op, r in enumerate(self.jitter_ranges) if r is not None)


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view: what a renderer applies."""

    crop: tuple[int, int, int, int]  # top, left, height, width in the decoded image
    flip: bool
    order: tuple[int, ...]  # colour-jitter ops applied, in order; () when jitter is off
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue (unused: NO_JITTER's)
    grayscale: bool
    blur: bool
    sigma: float  # 0 when not blurred
    solarize: bool


def _coin(p: float) -> bool:
    return p > 0 and bool(torch.rand(1) < p)


def _shape_only(height: int, width: int) -> Tensor:
    """An image-shaped tensor without storage: all that ``RandomResizedCrop.get_params`` reads of an image."""
    return torch.empty((), dtype=torch.uint8).expand(3, height, width)


def draw(view: ViewSpec, height: int, width: int) -> ViewParams:
    """The random parameters of one view of an image of the given size, from torch's global generator.

    torchvision's own samplers (``RandomResizedCrop.get_params``, ``ColorJitter.get_params``) in a fixed order:
    crop, flip, jitter, grayscale, blur (and its sigma), solarize. The order is part of the views' definition:
    changing it changes every view of every run.
    """
    top, left, h, w = T.RandomResizedCrop.get_params(_shape_only(height, width), list(view.scale), list(view.ratio))
    flip = _coin(view.flip_p)
    order: tuple[int, ...] = ()
    factors = NO_JITTER
    if _coin(view.jitter_p):
        perm, *values = T.ColorJitter.get_params(*view.jitter_ranges)
        order = tuple(op for op in perm.tolist() if values[op] is not None)
        b, c, s, u = (float(v) if v is not None else d for v, d in zip(values, NO_JITTER))
        factors = (b, c, s, u)
    grayscale = _coin(view.grayscale_p)
    blur = _coin(view.blur_p)
    sigma = float(torch.empty(1).uniform_(*view.blur_sigma)) if blur else 0.0
    return ViewParams((top, left, h, w), flip, order, factors, grayscale, blur, sigma, _coin(view.solarize_p))


def draw_views(views: Sequence[ViewSpec], height: int, width: int) -> list[ViewParams]:
    """The parameters of several views of one image, drawn in order (the caller seeds the generator)."""
    return [draw(v, height, width) for v in views]


def apply(image: Tensor, params: ViewParams, view: ViewSpec, mean: list[float], std: list[float]) -> Tensor:
    """Render one view on the CPU: a uint8 image (or a [T, 3, H, W] batch of frames) to a normalised float view.

    ``transforms.v2.functional`` kernels: the semantics of the v2 transforms at a fifth of their per-call
    overhead, which dominates at small image sizes.
    """
    top, left, h, w = params.crop
    x = F.resized_crop(image, top, left, h, w, [view.size, view.size], antialias=True)
    if params.flip:
        x = F.horizontal_flip(x)
    for op in params.order:
        if op == BRIGHTNESS:
            x = F.adjust_brightness(x, params.factors[op])
        elif op == CONTRAST:
            x = F.adjust_contrast(x, params.factors[op])
        elif op == SATURATION:
            x = F.adjust_saturation(x, params.factors[op])
        else:
            x = F.adjust_hue(x, params.factors[op])
    if params.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur:
        x = F.gaussian_blur(x, [view.blur_kernel, view.blur_kernel], [params.sigma, params.sigma])
    if params.solarize:
        x = F.solarize(x, 128)  # on uint8, before the float conversion
    return F.normalize(F.to_dtype(x, torch.float32, scale=True), mean, std)


class CPURenderer:
    """All global and local views of one decoded image (uint8 tensor [3, H, W], or frames [T, 3, H, W])."""

    def __init__(self, spec: AugmentConfig) -> None:
        self.spec, self.mean, self.std = spec, spec.mean, spec.std
        self.global_views = [ViewSpec.of(spec.global_crops, i) for i in range(spec.global_crops.count)]
        self.local_views = [ViewSpec.of(spec.local_crops, i) for i in range(spec.local_crops.count)]

    @property
    def views(self) -> list[ViewSpec]:
        """Global views, then local ones: the order of the draws and of the rendered views."""
        return self.global_views + self.local_views

    def draw(self, height: int, width: int) -> list[ViewParams]:
        return draw_views(self.views, height, width)

    def render(self, image: Tensor, params: Sequence[ViewParams]) -> tuple[list[Tensor], list[Tensor]]:
        """Apply drawn parameters (one per view, in :attr:`views` order)."""
        views = [apply(image, p, v, self.mean, self.std) for p, v in zip(params, self.views)]
        return views[: len(self.global_views)], views[len(self.global_views) :]

    def __call__(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.render(image, self.draw(*image.shape[-2:]))


class EvalTransform:
    """Deterministic view for probes: resize the short side, centre crop, normalise."""

    def __init__(self, size: int, mean: list[float], std: list[float], crop_fraction: float = 1.0) -> None:
        self.size, self.resize = size, int(round(size / crop_fraction))
        self.mean, self.std = mean, std

    def __call__(self, image: Tensor) -> Tensor:
        x = F.center_crop(F.resize(image, [self.resize], antialias=True), [self.size, self.size])
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
