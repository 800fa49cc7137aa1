"""Datasets that ship with the code, so the demo, the tests and CI need no download.

``shapes`` is procedural: ten shape kinds drawn with random colour, scale (50-90% of the frame), rotation and
position over random textured backgrounds (stripes, checkerboards, blotchy noise, gradients) plus pixel noise. It is
built so that raw pixels are poor features (pixel-space nearest neighbours land near chance: colour, texture and
placement dominate pixel distance) while the class is plain to a human and learnable by a small CNN - the gap a
self-supervised encoder has to close. ``digits`` is scikit-learn's bundled 8x8 handwritten
digits, upscaled: real (if tiny) data on which pixels are already decent features, a sanity check of the other kind.

Both yield webdataset sample dicts ``{"__key__", "png", "cls"}`` ready for :func:`ssltrain.data.shards.write_shards`.
:func:`synthetic_jpeg` makes photo-like JPEG samples for the benchmarks in ``bench/`` (decode cost, not content).
"""

from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "ring",
    "crescent",
    "arrow",
    "ellipse",
)
DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
DIGITS_TRAIN = 1200  # of sklearn's 1797; the remaining 597 are 'val'

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-reduced, which antialiases their edges
Polygon = list[tuple[float, float]]


# --- shape outlines in unit coordinates: centred at 0, bounding radius ~1, drawn as (polygon, on/off) layers ---


def _ngon(
    n: int, radius: float = 1.0, phase: float = 0.0, sx: float = 1.0, sy: float = 1.0, cx: float = 0.0
) -> Polygon:
    return [
        (cx + sx * radius * math.cos(phase + 2 * math.pi * k / n), sy * radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> Polygon:
    return [
        (
            (outer if k % 2 == 0 else inner) * math.cos(math.pi * k / points - math.pi / 2),
            (outer if k % 2 == 0 else inner) * math.sin(math.pi * k / points - math.pi / 2),
        )
        for k in range(2 * points)
    ]


def _heart(n: int = 40) -> Polygon:
    """The classic parametric heart, centred on its bounding box and scaled to bounding radius ~1."""
    ts = [2 * math.pi * k / n for k in range(n)]
    pts = [
        (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
        for t in ts
    ]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    r = max(math.hypot(x - cx, y - cy) for x, y in pts)
    return [((x - cx) / r, (y - cy) / r) for x, y in pts]


_HEART = _heart()
_CROSS_W = 0.3
_ARROW: Polygon = [(-1.0, -0.2), (0.15, -0.2), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.2), (-1.0, 0.2)]

_SHAPE_LAYERS: dict[str, list[tuple[Polygon, bool]]] = {
    "circle": [(_ngon(48, 0.95), True)],
    "square": [(_ngon(4, 1.0, math.pi / 4), True)],
    "triangle": [(_ngon(3, 1.0, -math.pi / 2), True)],
    "star": [(_star(), True)],
    "cross": [
        (
            [
                (x * 0.95, y * 0.95)
                for x, y in [
                    (-_CROSS_W, -1),
                    (_CROSS_W, -1),
                    (_CROSS_W, -_CROSS_W),
                    (1, -_CROSS_W),
                    (1, _CROSS_W),
                    (_CROSS_W, _CROSS_W),
                    (_CROSS_W, 1),
                    (-_CROSS_W, 1),
                    (-_CROSS_W, _CROSS_W),
                    (-1, _CROSS_W),
                    (-1, -_CROSS_W),
                    (-_CROSS_W, -_CROSS_W),
                ]
            ],
            True,
        )
    ],
    "heart": [(_HEART, True)],
    "ring": [(_ngon(48, 0.95), True), (_ngon(48, 0.55), False)],
    "crescent": [(_ngon(48, 0.95), True), (_ngon(48, 0.8, cx=0.45), False)],
    "arrow": [(_ARROW, True)],
    "ellipse": [(_ngon(48, 1.0, sx=1.0, sy=0.45), True)],
}
assert tuple(_SHAPE_LAYERS) == SHAPES_CLASSES


def _split_seed(seed: int, split: str) -> list[int]:
    """A stable (not PYTHONHASHSEED-dependent) seed per (seed, split), so splits never share a random stream."""
    return [seed, zlib.crc32(split.encode())]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --- backgrounds: a weight map w in [0, 1] that blends two colours ---


def _texture(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    kind = rng.integers(4)
    angle = rng.uniform(0, math.pi)
    u = math.cos(angle) * xx + math.sin(angle) * yy
    if kind == 0:  # soft stripes of random period and direction
        period = rng.uniform(3.0, size / 2.5)
        w = np.clip(0.5 + 2.0 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi)), 0.0, 1.0)
    elif kind == 1:  # rotated checkerboard
        v = -math.sin(angle) * xx + math.cos(angle) * yy
        cell = rng.uniform(2.5, size / 3)
        w = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == 2:  # smooth blotchy noise: a coarse random grid, upsampled
        grid = int(rng.integers(3, 9))
        coarse = Image.fromarray(rng.random((grid, grid), dtype=np.float32), "F")
        w = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
        w = np.clip((w - w.min()) / max(float(np.ptp(w)), 1e-6), 0.0, 1.0)
    else:  # linear gradient
        w = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    return w.astype(np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two background colours and a fill far enough from both that the shape is always visible."""
    c1 = rng.uniform(0, 255, 3)
    # Low-contrast texture: still a nuisance that defeats raw pixels, but the shape stays the dominant structure two
    # crops share (a stronger texture outweighs it in short SSL runs).
    c2 = np.clip(c1 + rng.uniform(-40, 40, 3), 0, 255)
    best, best_d = c1, -1.0  # the first draw always replaces c1 (distances are >= 0)
    for _ in range(16):
        fill = rng.uniform(0, 255, 3)
        d = float(min(np.linalg.norm(fill - c1), np.linalg.norm(fill - c2)))
        if d > best_d:
            best, best_d = fill, d
        if d >= 130:
            break
    return c1.astype(np.float32), c2.astype(np.float32), best.astype(np.float32)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    big = size * _SUPERSAMPLE
    scale = rng.uniform(0.5, 0.9) * size / 2  # bounding radius, in output pixels
    margin = 0.85 * scale  # the centre may sit so that up to ~15% of the radius leaves the frame
    cx, cy = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 0 else (size / 2, size / 2)
    theta = rng.uniform(0, 2 * math.pi)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly, on in _SHAPE_LAYERS[kind]:
        pts = [
            (
                (cx + scale * (x * cos_t - y * sin_t)) * _SUPERSAMPLE,
                (cy + scale * (x * sin_t + y * cos_t)) * _SUPERSAMPLE,
            )
            for x, y in poly
        ]
        draw.polygon(pts, fill=255 if on else 0)
    return np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def render_shape(rng: np.random.Generator, cls: int, size: int = 32) -> np.ndarray:
    """One ``size x size x 3`` uint8 image of class ``cls``, all other factors drawn from ``rng``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c1, c2, fill = _colours(rng)
    w = _texture(rng, size, yy, xx)[..., None]
    bg = c1 * (1 - w) + c2 * w
    # light shading across the shape so it is not a flat colour patch
    angle = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0, 0.25) * ((math.cos(angle) * xx + math.sin(angle) * yy) / size - 0.5)
    fg = np.clip(fill * shade[..., None], 0, 255)
    alpha = _shape_mask(rng, SHAPES_CLASSES[cls], size)[..., None]
    img = bg * (1 - alpha) + fg * alpha
    img += rng.normal(0, 6.0, img.shape).astype(np.float32)  # sensor-like noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def shapes_samples(split: str, count: int, seed: int = 0, size: int = 32) -> Iterator[dict]:
    """``count`` shape images for ``split`` (any name; each gets its own random stream from ``seed``).

    Deterministic: the same (split, seed, size) always gives the same images, and a shorter run is a prefix of a
    longer one. Classes cycle in a seeded shuffled order in blocks of ten, so any prefix is balanced to within one
    per class.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng(_split_seed(seed, split))
    n = len(SHAPES_CLASSES)
    order: list[int] = []
    for i in range(count):
        if i % n == 0:
            order = rng.permutation(n).tolist()
        cls = order[i % n]
        yield {"__key__": f"{split}-{i:07d}", "png": _png(render_shape(rng, cls, size)), "cls": cls}


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and only digits needs it

    bunch = load_digits()
    return bunch.images, bunch.target


def _digits_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into sklearn's digits for the split: stratified, a seeded permutation within each class."""
    target = _load_digits()[1]
    classes, counts = np.unique(target, return_counts=True)
    exact = counts * DIGITS_TRAIN / len(target)
    quota = np.floor(exact).astype(int)
    # largest remainders get the leftover train slots (ties by class order) so the train split is exactly 1200
    for c in np.argsort(-(exact - quota), kind="stable")[: DIGITS_TRAIN - quota.sum()]:
        quota[c] += 1
    rng = np.random.default_rng(_split_seed(seed, "digits"))
    train, val = [], []
    for c, q in zip(classes, quota):
        idx = rng.permutation(np.flatnonzero(target == c))
        train.append(idx[:q])
        val.append(idx[q:])
    picked = np.concatenate(train if split == "train" else val)
    return rng.permutation(picked), target


def digits_samples(split: str, seed: int = 0, size: int = 32) -> Iterator[dict]:
    """sklearn's handwritten digits as RGB ``size x size`` PNGs: 'train' = 1200 samples, 'val' = the other 597.

    The split depends on ``seed`` alone (not on ``split``), so the two splits always partition the 1797 images.
    Keys are ``digits-<split>-<NNNNN>``; order is a seeded shuffle, so shards mix classes.
    """
    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
    images = _load_digits()[0]  # 8x8 floats in 0..16
    indices, target = _digits_split(split, seed)
    for i, j in enumerate(indices):
        gray = Image.fromarray(np.round(images[j] * (255 / 16)).astype(np.uint8), "L")
        rgb = gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        yield {"__key__": f"digits-{split}-{i:05d}", "png": _png(np.asarray(rgb)), "cls": int(target[j])}


def _shapes_entry(split: str, count: int, seed: int = 0, size: int = 32) -> Iterator[dict]:
    return shapes_samples(split, count, seed=seed, size=size)


def _digits_entry(split: str, count: int | None = None, seed: int = 0, size: int = 32) -> Iterator[dict]:
    return digits_samples(split, seed=seed, size=size)  # fixed split sizes: ``count`` does not apply


def synthetic_jpeg(index: int, width: int | None = None, height: int | None = None, classes: int = 1000) -> dict:
    """A labelled JPEG sample that compresses and decodes like a photo (smooth fields, edges, grain), for benchmarks.

    A function of ``index`` alone; without ``width``/``height`` it has an ImageNet-like size (440-560 x 330-420).
    The label is random in ``[0, classes)``.
    """
    rng = np.random.default_rng(index)
    drawn_width, drawn_height = int(rng.integers(440, 560)), int(rng.integers(330, 420))
    width, height = width or drawn_width, height or drawn_height
    field = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    y, x = np.mgrid[0:height, 0:width]
    gradient = (np.cos(2 * np.pi * (x * rng.random() + y * rng.random()) / width + rng.random() * 6) * 40)[..., None]
    img = Image.fromarray(np.clip(np.asarray(field, dtype=np.float32) + gradient, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (
            x0,
            y0,
            x0 + int(rng.integers(20, max(21, width // 2))),
            y0 + int(rng.integers(20, max(21, height // 2))),
        )
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if int(rng.integers(0, 2)) == 0 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 6, (height, width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return {"__key__": f"{index:08d}", "jpg": buf.getvalue(), "cls": int(rng.integers(0, classes))}


class EmbeddedDataset(NamedTuple):
    classes: tuple[str, ...]
    samples: Callable[..., Iterator[dict]]  # (split, count, seed=0, size=32) -> sample dicts
    split_sizes: dict[str, int] | None  # fixed sizes per split, or None when ``count`` decides


# what a `shards <name>` command dispatches on
EMBEDDED: dict[str, EmbeddedDataset] = {
    "shapes": EmbeddedDataset(SHAPES_CLASSES, _shapes_entry, None),
    "digits": EmbeddedDataset(DIGITS_CLASSES, _digits_entry, {"train": DIGITS_TRAIN, "val": 1797 - DIGITS_TRAIN}),
}
