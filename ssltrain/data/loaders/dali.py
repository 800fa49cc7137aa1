"""The multi-crop AugmentSpec rendered by NVIDIA DALI (``data.loader=dali``): the same views as the CPU renderer.

Why it is built this way:

- Exact resume. Samples come from our ``GlobalBatchSampler`` through ``fn.external_source``, never from a DALI
  reader, so the order is the sample stream's and a resumed run continues it exactly. Every random choice is drawn on
  the host, per sample, by :func:`ssltrain.data.augment.draw` from the sample's own generator inside the seeded
  dataset, exactly as the CPU renderer draws it. DALI only applies the drawn ``ViewParams`` (no DALI random op), so
  a view is a function of (seed, position) alone: the same as on the CPU path, run after run, whatever the thread or
  worker count.
- Decode once: each image is decoded once (``mixed``: on the GPU) and every global and local view is cut from it.
- torchvision's semantics op for op, on uint8-valued pixels: brightness, contrast (pivot: the mean of the floored
  luma), saturation, HSV hue, the truncation to uint8 after each, grayscale, blur (odd kernel ~10% of the side,
  reflected border, rounded), solarize at 128, flip, normalise. The jitter order is per view: one DALI conditional
  per (slot, op). DALI's ``hue``/``hsv``/``color_twist`` are linear approximations and its ``contrast`` pivots on a
  constant, so they are not used. Only resampling differs (DALI's antialiased linear filter vs torch's).
- A bad sample never costs a batch. The host reads each image's header (a JPEG's end marker, a PNG's CRCs) without
  decoding it: a missing or unreadable image is skipped with the CPU path's reason; one DALI might not decode like
  PIL (another format or mode, a JPEG without its end) is rendered by the CPU renderer with the same parameters and
  put in its place. Should DALI still fail on a batch, that batch is rendered on the CPU.

The graph holds a copy of each jitter op per order slot and view, so per-operator overhead, not pixels, may bound
a GPU: measure with ``bench/data.py``.
"""

from __future__ import annotations

import io
import logging
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ssltrain.config import Config
from ssltrain.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    CPURenderer,
    SampleRandom,
    ViewParams,
    ViewSpec,
)
from ssltrain.data.loaders.cpu import DECODE_ERRORS, AugmentedShards, build_cpu_loader, decode_reason
from ssltrain.data.loaders.dataset import (
    BatchMasks,
    Sample,
    SeededSamples,
    Skipped,
    Unreadable,
    Views,
    make_loader,
)
from ssltrain.data.stream import GlobalBatchSampler, RawSample, ShardCatalog

log = logging.getLogger(__name__)

DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"}  # PIL's names of formats DALI decodes
DALI_MODES = {"RGB", "RGBA", "L", "LA", "P"}  # PIL modes whose convert("RGB") DALI reproduces (checked)
INSTALL_HINT = "pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12)"
LUMA = (0.2989, 0.587, 0.114)  # torchvision's grayscale weights

fn: Any = None  # nvidia.dali modules, bound by _import_dali(): DALI is optional
types: Any = None
dmath: Any = None
pipeline_def: Any = None


def _import_dali() -> None:
    global fn, types, dmath, pipeline_def
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types


# --- host side: read, check, draw --------------------------------------------------------------------------------


@dataclass
class _Ready:
    """A sample for DALI: its encoded image and the parameters of every view."""

    data: np.ndarray
    params: list[ViewParams]
    index: int
    position: int
    label: int | None


@dataclass
class _OnCPU:
    """A sample DALI might not decode as PIL does: the CPU renderer decodes (or skips) it, same parameters."""

    sample_id: int
    position: int


def _dali_decodes_like_pil(img: Image.Image, data: bytes) -> bool:
    if img.format not in DALI_FORMATS or img.mode not in DALI_MODES:
        return False
    if img.format == "JPEG":
        return b"\xff\xd9" in data[-64:]  # a JPEG cut before its end marker: PIL refuses it, DALI may not
    if img.format == "PNG":
        try:
            img.verify()  # chunk CRCs, no decompression
        except DECODE_ERRORS:
            return False
    return True


class _HostDraws:
    """DALI's renderer in the seeded dataset: checks the image's header without decoding the pixels, draws the
    parameters of every view."""

    def __init__(self, renderer: CPURenderer) -> None:
        self.renderer = renderer

    def __call__(self, raw: RawSample, sample_id: int, position: int, rng: SampleRandom) -> _Ready | _OnCPU:
        assert raw.image is not None  # the dataset skips samples without one
        try:
            img = Image.open(io.BytesIO(raw.image))
        except DECODE_ERRORS as err:  # the CPU path fails on the same call, with this reason
            raise Unreadable(decode_reason(err)) from None
        with img:
            (width, height), ok = img.size, _dali_decodes_like_pil(img, raw.image)
        if not ok:
            return _OnCPU(sample_id, position)
        params = self.renderer.draw(height, width, rng)
        return _Ready(np.frombuffer(raw.image, dtype=np.uint8), params, sample_id, position, raw.label)


# --- the DALI graph ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ViewPlan:
    """What one view can do (probability > 0): only that gets graph nodes and per-sample inputs."""

    size: int
    kernel: int
    flip: bool
    ops: tuple[int, ...]  # jitter ops that can run, one order slot each
    grayscale: bool
    blur: bool
    solarize: bool

    @classmethod
    def of(cls, view: ViewSpec) -> _ViewPlan:
        return cls(
            view.size,
            view.blur_kernel,
            view.flip_p > 0,
            view.jitter_ops,
            view.grayscale_p > 0,
            view.blur_p > 0,
            view.solarize_p > 0,
        )

    def columns(self, params: list[ViewParams]) -> dict[str, np.ndarray]:
        """This view's per-sample inputs for a batch: one array per field, the outer dimension is the sample."""
        crops = np.array([p.crop for p in params], dtype=np.int32).reshape(-1, 4)
        cols: dict[str, np.ndarray] = {
            "anchor": np.ascontiguousarray(crops[:, :2]),
            "shape": np.ascontiguousarray(crops[:, 2:]),
        }
        if self.flip:
            cols["flip"] = np.array([p.flip for p in params], dtype=np.int32)
        for slot in range(len(self.ops)):
            for op in self.ops:
                cols[f"slot{slot}_op{op}"] = np.array(
                    [len(p.order) > slot and p.order[slot] == op for p in params], dtype=bool
                )
        f = np.array([p.factors for p in params], dtype=np.float64).reshape(-1, 4)
        if BRIGHTNESS in self.ops:
            cols["b"] = f[:, 0]
        if CONTRAST in self.ops:
            cols["c"], cols["1-c"] = f[:, 1], 1.0 - f[:, 1]
        if SATURATION in self.ops:
            cols["s"], cols["1-s"] = f[:, 2], 1.0 - f[:, 2]
        if HUE in self.ops:  # hue shift in sextants, plus each channel's phase (R 5, G 3, B 1) and 6 to stay positive
            cols["hue"] = 6.0 * f[:, 3:4] + np.array([[11.0, 9.0, 7.0]])
        if self.grayscale:
            cols["grayscale"] = np.array([p.grayscale for p in params], dtype=bool)
        if self.blur:
            cols["blur"] = np.array([p.blur for p in params], dtype=bool)
            cols["sigma"] = np.array([p.sigma if p.blur else 1.0 for p in params])
        if self.solarize:
            cols["solarize"] = np.array([p.solarize for p in params], dtype=bool)
        return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in cols.items()}

    def fields(self) -> list[str]:
        return list(self.columns([]))


def _quantize(x: Any) -> Any:
    """torchvision's float -> uint8 cast after a colour op: clamp, then truncate."""
    return dmath.floor(dmath.clamp(x, 0.0, 255.0))


def _luma(x: Any) -> Any:
    """The floored luma [H, W, 1] that torchvision's colour ops compute on uint8 images."""
    return dmath.floor(fn.reductions.sum(x * types.Constant(np.array(LUMA, dtype=np.float32)), axes=2, keep_dims=True))


def _brightness(x: Any, v: dict) -> Any:
    return _quantize(x * v["b"])


def _contrast(x: Any, v: dict) -> Any:
    return _quantize(x * v["c"] + fn.reductions.mean(_luma(x)) * v["1-c"])


def _saturation(x: Any, v: dict) -> Any:
    return _quantize(x * v["s"] + _luma(x) * v["1-s"])


def _hue(x: Any, v: dict) -> Any:
    """torchvision's HSV hue shift: the hue in sextants is rotated, then each channel is max - range * t(phase)."""
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc, minc = dmath.max(dmath.max(r, g), b), dmath.min(dmath.min(r, g), b)
    span = maxc - minc
    div = span + (span == 0.0)  # grey pixels: any hue, span 0 keeps them grey
    not_r = maxc != r
    sextant = (
        (maxc == r) * ((g - b) / div)
        + ((maxc == g) & not_r) * (2.0 + (b - r) / div)
        + ((maxc != g) & not_r) * (4.0 + (r - g) / div)
    )
    phase = sextant + v["hue"]  # [H, W, 3]: per channel, hue + shift + channel phase, all in sextants
    phase = phase - 6.0 * dmath.floor(phase / 6.0)
    t = dmath.clamp(dmath.min(phase, 4.0 - phase), 0.0, 1.0)
    return dmath.floor((maxc - span * t) * (255.999 / 255.0))  # to_dtype's float -> uint8 cast


def _grayscale(x: Any) -> Any:
    y = _luma(x)
    return fn.cat(y, y, y, axis=2)


def _blur(x: Any, v: dict, kernel: int) -> Any:
    return dmath.floor(fn.gaussian_blur(x, window_size=kernel, sigma=v["sigma"]) + 0.5)


def _solarize(x: Any) -> Any:
    return 127.5 - dmath.abs(x - 127.5)  # x below 128, 255 - x from 128 on (exact on whole numbers)


_JITTER = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _saturation, HUE: _hue}


def _render_view(image: Any, v: dict, plan: _ViewPlan, mean: list[float], std: list[float]) -> Any:
    """One view in :func:`ssltrain.data.augment.apply`'s order; flip comes last, in the normalisation (it commutes
    with all the rest). An outer ``if`` is decided when the graph is built, an inner one per sample by DALI."""
    x = fn.slice(image, v["anchor"], v["shape"], axes=[0, 1])
    x = fn.resize(x, size=[plan.size, plan.size], interp_type=types.INTERP_LINEAR, antialias=True)
    x = fn.cast(x, dtype=types.FLOAT)
    for slot in range(len(plan.ops)):
        for op in plan.ops:
            if v[f"slot{slot}_op{op}"]:
                x = _JITTER[op](x, v)
    if plan.grayscale:  # noqa: SIM102 - a graph-build-time condition around a per-sample DALI conditional
        if v["grayscale"]:
            x = _grayscale(x)
    if plan.blur:  # noqa: SIM102 - as above
        if v["blur"]:
            x = _blur(x, v, plan.kernel)
    if plan.solarize:  # noqa: SIM102 - as above
        if v["solarize"]:
            x = _solarize(x)
    return fn.crop_mirror_normalize(
        x,
        mirror=v["flip"] if plan.flip else 0,
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


@contextmanager
def _deep_recursion(limit: int = 20_000) -> Iterator[None]:
    """DALI walks the graph recursively; a multi-crop graph is a few hundred operators deep."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _build_pipeline(
    plans: list[_ViewPlan],
    feed: _Feed,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    mean: list[float],
    std: list[float],
) -> Any:
    n_inputs = 1 + sum(len(p.fields()) for p in plans)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=2,
        enable_conditionals=True,
        exec_dynamic=True,
    )
    def graph():
        inputs = fn.external_source(source=feed, num_outputs=n_inputs, batch=True)
        image = fn.decoders.image(
            inputs[0], device="cpu" if device_id is None else "mixed", output_type=types.RGB, adjust_orientation=False
        )  # PIL ignores EXIF orientation too
        outputs, i = [], 1
        for plan in plans:
            names = plan.fields()
            outputs.append(_render_view(image, dict(zip(names, inputs[i : i + len(names)])), plan, mean, std))
            i += len(names)
        return tuple(outputs)

    with _deep_recursion():
        pipe = graph()
        pipe.build()
    return pipe


@dataclass
class _HostBatch:
    """One sampler batch: its items in order, DALI's inputs for the ``_Ready`` ones and the masks of every sample
    not skipped (both built in the workers)."""

    items: list
    inputs: tuple | None
    masks: dict[str, Tensor] = field(default_factory=dict)
    mask_positions: list[int] = field(default_factory=list)  # the positions of the masks' rows

    def masks_of(self, positions: list[int]) -> dict[str, Tensor]:
        """The mask rows of the samples that made it into the batch (one rendered on the CPU may be skipped there)."""
        if positions == self.mask_positions:
            return self.masks
        row = {p: i for i, p in enumerate(self.mask_positions)}
        keep = torch.tensor([row[p] for p in positions], dtype=torch.long)
        return {name: m[keep] for name, m in self.masks.items()}


class _Collate:
    """DataLoader collate: lays out the per-sample view parameters as DALI's per-field batch arrays, and draws the
    masks of a masked method."""

    def __init__(self, plans: list[_ViewPlan], masks: BatchMasks | None = None) -> None:
        self.plans, self.masks = plans, masks

    def __call__(self, items: list) -> _HostBatch:
        batch = _HostBatch(items, None)
        if self.masks is not None:
            batch.mask_positions = [x.position for x in items if isinstance(x, (_Ready, _OnCPU))]
            if batch.mask_positions:
                batch.masks = dict(self.masks(np.asarray(batch.mask_positions, dtype=np.int64)))
        ready = [x for x in items if isinstance(x, _Ready)]
        if ready:
            inputs: list[Any] = [[x.data for x in ready]]
            for v, plan in enumerate(self.plans):
                inputs += plan.columns([x.params[v] for x in ready]).values()
            batch.inputs = tuple(inputs)
        return batch


class _Feed:
    """DALI's external source: pulls host batches in sampler order, keeps them in ``pending``, yields DALI's part.

    DALI pulls ahead (its prefetch queue), so ``pending`` also holds the batches DALI has nothing to do for (every
    sample skipped or left to the CPU), in order, for the consumer to interleave.
    """

    def __init__(self) -> None:
        self.batches: Iterator[_HostBatch] = iter(())
        self.pending: deque[_HostBatch] = deque()
        self.failed: BaseException | None = None

    def start(self, batches: Iterator[_HostBatch]) -> None:
        self.batches, self.failed = batches, None
        self.pending.clear()

    def __iter__(self) -> Iterator[tuple]:
        while True:
            try:
                batch = next(self.batches)
            except StopIteration:
                return
            except BaseException as err:  # a reader failure, not DALI's: the consumer re-raises it
                self.failed = err
                raise
            self.pending.append(batch)
            if batch.inputs is not None:
                yield batch.inputs


class DaliLoader:
    """This rank's batches of views rendered by DALI: one ``Views`` per item of ``sampler``, in order.

    Host work (reading, header checks, parameter draws) runs in ``data.workers`` DataLoader processes, in order;
    DALI runs ``max(1, data.workers)`` threads and prefetches two batches in its own queue.
    """

    def __init__(
        self,
        cfg: Config,
        catalog: ShardCatalog,
        sampler: GlobalBatchSampler,
        device_id: int | None,
        masks: BatchMasks | None = None,
    ) -> None:
        _import_dali()
        self.masks = masks
        self.renderer = CPURenderer(cfg.augment)
        self.plans = [_ViewPlan.of(v) for v in self.renderer.views]
        self.n_global = len(self.renderer.global_views)
        self.sampler, self.workers = sampler, cfg.data.workers
        self.host = SeededSamples(catalog, _HostDraws(self.renderer), cfg.seed)
        self.cpu = AugmentedShards(catalog, self.renderer, cfg.seed)
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._pipe_args = (sampler.local_batch, max(1, cfg.data.workers), device_id, cfg.augment.mean, cfg.augment.std)
        self._feed = _Feed()
        self._pipe = _build_pipeline(self.plans, self._feed, *self._pipe_args)  # fails here if DALI cannot run
        self._used = False
        self.failures = 0  # batches DALI failed on, rendered on the CPU instead

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Views]:
        if self._used:  # a pipeline keeps what it prefetched: another pass gets a new one
            self._feed = _Feed()
            self._pipe = _build_pipeline(self.plans, self._feed, *self._pipe_args)
        self._used = True
        collate = _Collate(self.plans, self.masks)
        host = make_loader(self.host, self.workers, batch_sampler=self.sampler, collate=collate)
        self._feed.start(iter(host))
        pending = self._feed.pending
        while True:
            error = None
            try:
                outputs = self._pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:
                if self._feed.failed is not None:
                    raise
                outputs, error = None, err
            while pending and pending[0].inputs is None:  # batches before it that DALI had nothing to do for
                yield self._assemble(pending.popleft(), None)
            if not pending:  # DALI failed before it took a batch of ours: nothing to render in its place
                raise error or RuntimeError("DALI returned a batch it was not given")
            batch = pending.popleft()
            if error is not None:
                self.failures += 1
                if self.failures <= 10 or self.failures % 1000 == 0:
                    log.warning(
                        "DALI failed on a batch (%d so far); rendering it on the CPU with the same parameters: %s",
                        self.failures,
                        _error_summary(error),
                    )
                batch.items = [_OnCPU(x.index, x.position) if isinstance(x, _Ready) else x for x in batch.items]
            yield self._assemble(batch, outputs)
        while pending:
            yield self._assemble(pending.popleft(), None)

    def _to_torch(self, outputs: tuple) -> list[Tensor]:
        """DALI's output batches as torch tensors, without a copy (DLPack; on the GPU, stream-ordered)."""
        tensors = []
        for out in outputs:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    tensors.append(torch.from_dlpack(out.as_tensor()))
            else:
                tensors.append(torch.from_dlpack(out.as_tensor()))
        return tensors

    def _assemble(self, batch: _HostBatch, outputs: tuple | None) -> Views:
        """Put DALI's rows and CPU-rendered samples in sampler order; report the skipped ones."""
        rendered = self._to_torch(outputs) if outputs is not None else None
        rows: list[int | Sample] = []
        index, labels, positions, skipped = [], [], [], []
        next_row = 0
        for item in batch.items:
            if isinstance(item, _OnCPU):
                item = self.cpu[(item.sample_id, item.position)]
            if isinstance(item, Skipped):
                skipped.append(f"{item.where}: {item.reason}")
                continue
            if isinstance(item, _Ready):
                rows.append(next_row)
                next_row += 1
            else:
                rows.append(item)
            index.append(item.index)
            labels.append(item.label)
            positions.append(item.position)
        if not rows:
            return Views([], [], torch.empty(0, dtype=torch.long), None, skipped, torch.empty(0, dtype=torch.long))
        if rendered is not None and all(isinstance(r, int) for r in rows):
            views = rendered
        else:
            dali_rows = rendered if rendered is not None else []  # None: every row was rendered on the CPU
            views = [
                torch.stack(
                    [
                        dali_rows[v][r] if isinstance(r, int) else (r.global_views + r.local_views)[v].to(self.device)
                        for r in rows
                    ]
                )
                for v in range(len(self.plans))
            ]
        return Views(
            views[: self.n_global],
            views[self.n_global :],
            torch.tensor(index, dtype=torch.long),
            torch.tensor(labels, dtype=torch.long) if all(lbl is not None for lbl in labels) else None,
            skipped,
            torch.tensor(positions, dtype=torch.long),
            batch.masks_of(positions) if self.masks is not None else {},
        )


def _error_summary(err: BaseException) -> str:
    """DALI's operator and cause, without the traceback of the graph definition."""
    text = str(err)
    where = next((line.strip().rstrip(",") for line in text.splitlines() if line.strip().startswith("Error in")), "")
    cause = text.split("encountered:", 1)[-1]
    cause = " ".join(line.strip() for line in cause.splitlines() if line.strip() and "no longer valid" not in line)
    return f"{where}: {cause}"[:300] if where else cause[:300]


def build_dali_loader(
    cfg: Config,
    catalog: ShardCatalog,
    sampler: GlobalBatchSampler,
    device: torch.device,
    masks: BatchMasks | None = None,
) -> Iterable[Views]:
    """DALI on ``device`` (``mixed`` decode on a GPU, CPU mode otherwise), or the CPU loader when DALI cannot run."""
    try:
        _import_dali()
    except Exception as err:  # ImportError, or a broken install failing to load its libraries
        log.warning(
            "data.loader=dali, but NVIDIA DALI cannot be imported (%s: %s): using the CPU loader instead. "
            "Install DALI with `%s`, or set data.loader=torch.",
            type(err).__name__,
            err,
            INSTALL_HINT,
        )
        return build_cpu_loader(cfg, catalog, sampler, device, masks)
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    else:
        log.warning(
            "data.loader=dali without a GPU: DALI runs in CPU mode (device_id=None, %d threads). It renders "
            "the same views, but the GPU decode is what makes it fast; data.loader=torch may be faster here.",
            max(1, cfg.data.workers),
        )
    try:
        return DaliLoader(cfg, catalog, sampler, device_id, masks)
    except RuntimeError as err:
        log.warning(
            "DALI cannot run on %s (%s): using the CPU loader instead. Check that the DALI wheel matches the "
            "CUDA driver (`%s`), or set data.loader=torch.",
            device,
            _error_summary(err),
            INSTALL_HINT,
        )
        return build_cpu_loader(cfg, catalog, sampler, device, masks)
