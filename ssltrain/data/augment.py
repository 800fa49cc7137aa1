"""The multi-crop AugmentSpec: a view's random parameters are drawn here, once, and every renderer applies them.

The spec is data (:class:`ssltrain.config.AugmentConfig`); :class:`ViewSpec` is one view of it, resolved.
:func:`draw` makes every random choice of a view (crop box, flip, colour-jitter order and strengths, grayscale,
blur sigma, solarize) into a :class:`ViewParams`; the CPU renderer (:func:`apply`: torchvision's v2 kernels and a
separable Gaussian blur), the DALI graph and the video loader all apply those parameters, so a recipe means the same
thing on every path and the views agree across them. Every draw takes the sample's own :class:`SampleRandom` (made
once per sample from (seed, position) by the seeded dataset) explicitly: no global random state is seeded or touched
(forking and seeding torch's global generator per sample cost more than drawing a small view), and the views of a
sample are a function of (seed, sample position) alone, whatever the worker count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from ssltrain.config import AugmentConfig, CropConfig
from ssltrain.data.stream import sample_seed

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


class SampleRandom:
    """The random numbers of one sample: a ``torch.Generator`` of its own, seeded once, read in blocks.

    Uniforms are drawn ``BLOCK`` at a time (one float64 tensor call) and handed out in order, so a draw costs a list
    read, not a tensor op; what a sample gets is a function of its seed and the order of its draws only.
    """

    BLOCK = 64

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._block: list[float] = []
        self._next = 0

    @classmethod
    def of(cls, seed: int, position: int) -> SampleRandom:
        """The generator of the sample at global ``position`` of the run seeded ``seed``."""
        return cls(sample_seed(seed, position))

    def random(self) -> float:
        """Uniform on [0, 1)."""
        if self._next == len(self._block):
            self._block = torch.rand(self.BLOCK, generator=self.generator, dtype=torch.float64).tolist()
            self._next = 0
        self._next += 1
        return self._block[self._next - 1]

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def coin(self, p: float) -> bool:
        """True with probability ``p``; ``p <= 0`` draws nothing (a disabled op consumes no number)."""
        return p > 0 and self.random() < p

    def integer(self, low: int, high: int) -> int:
        """Uniform on ``range(low, high)``, as ``torch.randint(low, high)``."""
        return min(high - 1, low + int(self.random() * (high - low)))

    def permutation(self, n: int) -> list[int]:
        """A uniform permutation of ``range(n)`` (Fisher-Yates)."""
        perm = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.integer(0, i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        return perm


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


def resized_crop_box(
    height: int, width: int, scale: Range, ratio: Range, rng: SampleRandom
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (torchvision 0.29, transforms/transforms.py) drawing from ``rng``: ten tries
    of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the central crop clamped to
    ``ratio``. Returns (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integer(0, height - h + 1), rng.integer(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw(view: ViewSpec, height: int, width: int, rng: SampleRandom) -> ViewParams:
    """The random parameters of one view of an image of the given size, from the sample's ``rng``.

    torchvision's samplers' distributions (``RandomResizedCrop.get_params``, ``ColorJitter.get_params``) in a
    fixed order: crop, flip, jitter (order, then strengths), grayscale, blur (and its sigma), solarize. The order is
    part of the views' definition: changing it changes every view of every run.
    """
    top, left, h, w = resized_crop_box(height, width, view.scale, view.ratio, rng)
    flip = rng.coin(view.flip_p)
    order: tuple[int, ...] = ()
    factors = NO_JITTER
    if rng.coin(view.jitter_p):
        perm = rng.permutation(4)
        values = [rng.uniform(*r) if r is not None else None for r in view.jitter_ranges]
        order = tuple(op for op in perm if values[op] is not None)
        b, c, s, u = (v if v is not None else d for v, d in zip(values, NO_JITTER))
        factors = (b, c, s, u)
    grayscale = rng.coin(view.grayscale_p)
    blur = rng.coin(view.blur_p)
    sigma = rng.uniform(*view.blur_sigma) if blur else 0.0
    return ViewParams((top, left, h, w), flip, order, factors, grayscale, blur, sigma, rng.coin(view.solarize_p))


def draw_views(views: Sequence[ViewSpec], height: int, width: int, rng: SampleRandom) -> list[ViewParams]:
    """The parameters of several views of one image, drawn in order from the sample's ``rng``."""
    return [draw(v, height, width, rng) for v in views]


def _blur_weights(kernel: int, sigma: float) -> list[float]:
    """torchvision's 1-D Gaussian kernel (``_get_gaussian_kernel1d``): ``kernel`` taps, normalised to sum 1."""
    half = (kernel - 1) * 0.5
    pdf = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(kernel)]
    total = sum(pdf)
    return [p / total for p in pdf]


def _blur_rows(x: Tensor, weights: list[float]) -> Tensor:
    """Blur along dim -2 of a padded float tensor (``len(weights) - 1`` rows longer than the result): a weighted sum
    of shifted slices, each a contiguous block of rows."""
    n = x.shape[-2] - len(weights) + 1
    out = x[..., 0:n, :] * weights[0]
    for i, w in enumerate(weights[1:], start=1):
        out.add_(x[..., i : i + n, :], alpha=w)
    return out


def gaussian_blur(image: Tensor, kernel: int, sigma: float) -> Tensor:
    """``transforms.v2.functional.gaussian_blur`` with a square kernel, separably: the same 1-D weights and reflected
    border (the edge pixel not repeated), two 1-D passes instead of one 2-D convolution (``kernel`` instead of
    ``kernel**2`` multiply-adds a pixel). On uint8 it rounds as torchvision does; the sums' float rounding differs,
    so a pixel may differ by one level. Any leading dimensions (frames)."""
    shape, dtype = image.shape, image.dtype
    weights, pad = _blur_weights(kernel, sigma), kernel // 2
    x = image.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    x = tnf.pad(x, [pad, pad, pad, pad], mode="reflect")[:, 0]
    x = _blur_rows(x, weights)  # vertical: [N, H, W + 2 pad]
    x = _blur_rows(x.transpose(-1, -2).contiguous(), weights).transpose(-1, -2)  # horizontal, as rows
    if not dtype.is_floating_point:
        x = x.round_()
    return x.to(dtype).reshape(shape)


def apply(image: Tensor, params: ViewParams, view: ViewSpec, mean: list[float], std: list[float]) -> Tensor:
    """Render one view on the CPU: a uint8 image (or a [T, 3, H, W] batch of frames) to a normalised float view.

    ``transforms.v2.functional`` kernels: the semantics of the v2 transforms without their per-call overhead, which
    dominates at small image sizes; the blur is :func:`gaussian_blur`, separable, where torchvision convolves in 2-D.
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
        x = gaussian_blur(x, view.blur_kernel, params.sigma)
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

    def draw(self, height: int, width: int, rng: SampleRandom) -> list[ViewParams]:
        return draw_views(self.views, height, width, rng)

    def render(self, image: Tensor, params: Sequence[ViewParams]) -> tuple[list[Tensor], list[Tensor]]:
        """Apply drawn parameters (one per view, in :attr:`views` order)."""
        views = [apply(image, p, v, self.mean, self.std) for p, v in zip(params, self.views)]
        return views[: len(self.global_views)], views[len(self.global_views) :]

    def __call__(self, image: Tensor, rng: SampleRandom) -> tuple[list[Tensor], list[Tensor]]:
        return self.render(image, self.draw(image.shape[-2], image.shape[-1], rng))


class EvalTransform:
    """Deterministic view for probes: resize the short side, centre crop, normalise."""

    def __init__(self, size: int, mean: list[float], std: list[float], crop_fraction: float = 1.0) -> None:
        self.size, self.resize = size, int(round(size / crop_fraction))
        self.mean, self.std = mean, std

    def __call__(self, image: Tensor) -> Tensor:
        x = F.center_crop(F.resize(image, [self.resize], antialias=True), [self.size, self.size])
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
