"""The DALI renderer (``data.loader=dali``), in DALI's CPU mode: the CPU renderer's draws, its pixels within a level
or two, the sample stream's order and exact resume, bad samples skipped like the CPU path, the fallback without
DALI. The ``gpu`` test runs the ``mixed`` path where there is a CUDA device."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

pytest.importorskip("nvidia.dali")

from conftest import tiny_config  # noqa: E402

from ssltrain.config import AugmentConfig, CropConfig  # noqa: E402
from ssltrain.data import augment  # noqa: E402
from ssltrain.data.augment import CPURenderer, SampleRandom, ViewParams  # noqa: E402
from ssltrain.data.loaders import build_train_loader, dali  # noqa: E402
from ssltrain.data.loaders.dali import DaliLoader, build_dali_loader  # noqa: E402
from ssltrain.data.masks import MaskDraw, sample_rng  # noqa: E402
from ssltrain.data.shards import write_shards  # noqa: E402
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog, sample_seed  # noqa: E402

CPU = torch.device("cpu")
STD255 = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # normalised units -> uint8 levels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_image(i: int, height: int, width: int) -> np.ndarray:
    """Natural-ish content: smooth colour waves, a different phase and frequency per sample."""
    r = np.random.default_rng(i).random(6)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [
        np.sin(6 * x * r[0] + 5 * y * r[1] + 6 * r[2]),
        np.cos(4 * y * r[3] - 3 * x + 6 * r[4]),
        np.sin(9 * x * y + 6 * r[5]),
    ]
    return (np.stack(waves, -1) * 127.5 + 127.5).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write(out: Path, samples: list[dict]) -> str:
    write_shards(samples, out, "train")
    return str(out)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """48 labeled samples: JPEGs and PNGs of three shapes (landscape, portrait, square)."""
    shapes = [(24, 32), (32, 24), (28, 28)]
    samples = []
    for i in range(48):
        fmt = "JPEG" if i % 2 else "PNG"
        samples.append(
            {
                "__key__": f"s{i:04d}",
                fmt.lower().replace("jpeg", "jpg"): encode(smooth_image(i, *shapes[i % 3]), fmt),
                "cls": i % 4,
            }
        )
    return write(tmp_path_factory.mktemp("mixed"), samples)


def loaders(cfg, spec: str, batch: int, masks: MaskDraw | None = None, **sampler_kw):
    catalog = ShardCatalog.from_spec(spec)
    sampler = GlobalBatchSampler(len(catalog), batch, cfg.seed, **sampler_kw)
    return DaliLoader(cfg, catalog, sampler, None, masks), build_train_loader(cfg, catalog, sampler, CPU, masks)


def position_masks(seed: int, batch: int) -> MaskDraw:
    """A mask generator whose rows say which sample they were drawn for: its position, and a draw from it."""

    def draw(positions: np.ndarray, seed: int, group_size: int) -> dict[str, torch.Tensor]:
        noise = [sample_rng(seed, int(p)).random() for p in positions]
        return {"position": torch.from_numpy(positions.copy()), "noise": torch.tensor(noise, dtype=torch.float64)}

    return MaskDraw(draw, seed, batch)


def level_diffs(a: list, b: list) -> torch.Tensor:
    """Per-pixel |DALI - CPU| in uint8 levels over all views of all batches."""
    out = []
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index)
        for u, v in zip(x.global_views + x.local_views, y.global_views + y.local_views):
            assert u.shape == v.shape and u.dtype == v.dtype == torch.float32
            out.append(((u - v) * STD255).abs().flatten())
    return torch.cat(out)


# --- the draws -----------------------------------------------------------------------------------------------------


def draw_params(renderer: CPURenderer, height: int, width: int, seed: int) -> list[ViewParams]:
    """The parameters of all views of one sample, as the seeded dataset draws them for DALI."""
    return renderer.draw(height, width, SampleRandom(seed))


class Recorder:
    """Stands in for ``transforms.v2.functional`` inside augment.py: applies every call and records its parameters."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        real = getattr(TF, name)

        def call(*args, **kwargs):
            self.calls.append((name, args[1:]))
            return real(*args, **kwargs)

        return call

    def record(self, name: str, args: tuple, result: torch.Tensor) -> torch.Tensor:
        self.calls.append((name, args))
        return result

    def views(self) -> list[dict]:
        """What each view did, in call order: crop, flip, jitter ops with factors, grayscale, blur sigma, solarize."""
        views = []
        ops = {"adjust_brightness": 0, "adjust_contrast": 1, "adjust_saturation": 2, "adjust_hue": 3}
        for name, args in self.calls:
            if name == "resized_crop":
                views.append(
                    {
                        "crop": tuple(args[:4]),
                        "flip": False,
                        "order": [],
                        "factors": {},
                        "gray": False,
                        "sigma": None,
                        "solarize": False,
                    }
                )
            elif name == "horizontal_flip":
                views[-1]["flip"] = True
            elif name in ops:
                views[-1]["order"].append(ops[name])
                views[-1]["factors"][ops[name]] = args[0]
            elif name == "rgb_to_grayscale":
                views[-1]["gray"] = True
            elif name == "gaussian_blur":
                views[-1]["sigma"] = args[1]
            elif name == "solarize":
                views[-1]["solarize"] = True
        return views


@pytest.mark.parametrize(
    "spec",
    [
        AugmentConfig(local_crops=CropConfig(count=3, size=8, scale=[0.05, 0.4], blur_p=[0.5], solarize_p=[0.0])),
        AugmentConfig(global_crops=CropConfig(size=12, brightness=0.0, hue=0.0, blur_p=[0.3, 1.0], solarize_p=[0.5])),
    ],
)
def test_host_draws_are_the_cpu_renderers_draws(spec: AugmentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = CPURenderer(spec)
    image = torch.from_numpy(smooth_image(0, 30, 40)).permute(2, 0, 1).contiguous()
    recorder = Recorder()
    monkeypatch.setattr(augment, "F", recorder)
    blur = augment.gaussian_blur
    monkeypatch.setattr(
        augment, "gaussian_blur", lambda x, k, s: recorder.record("gaussian_blur", (k, s), blur(x, k, s))
    )
    for position in range(60):
        recorder.calls.clear()
        seed = sample_seed(7, position)
        renderer(image, SampleRandom(seed))
        drawn = draw_params(renderer, 30, 40, seed)
        done = recorder.views()
        assert len(drawn) == len(done) == spec.global_crops.count + spec.local_crops.count
        for p, d in zip(drawn, done):
            assert p.crop == d["crop"] and p.flip == d["flip"] and list(p.order) == d["order"]
            assert all(p.factors[op] == f for op, f in d["factors"].items())
            assert p.grayscale == d["gray"] and p.solarize == d["solarize"]
            assert p.blur == (d["sigma"] is not None) and (not p.blur or p.sigma == d["sigma"])


def test_host_draws_follow_torchvisions_distributions_and_the_configured_probabilities() -> None:
    crop = CropConfig(size=16, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])
    renderer = CPURenderer(AugmentConfig(global_crops=crop))
    n, height, width = 2000, 300, 400
    draws = [draw_params(renderer, height, width, sample_seed(1, i)) for i in range(n)]
    torch.manual_seed(123)  # torchvision's own sampler, an independent stream
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    reference = np.array([T.RandomResizedCrop.get_params(image, crop.scale, crop.ratio) for _ in range(n)])
    ours = np.array([v.crop for d in draws for v in d[:1]])
    for data in (ours, reference):
        assert data[:, 0].min() >= 0 and (data[:, 0] + data[:, 2]).max() <= height
        assert data[:, 1].min() >= 0 and (data[:, 1] + data[:, 3]).max() <= width
    q = np.linspace(0.05, 0.95, 10)
    area = lambda c: c[:, 2] * c[:, 3] / (height * width)  # noqa: E731
    log_ratio = lambda c: np.log(c[:, 3] / c[:, 2])  # noqa: E731
    assert np.abs(np.quantile(area(ours), q) - np.quantile(area(reference), q)).max() < 0.04
    assert np.abs(np.quantile(log_ratio(ours), q) - np.quantile(log_ratio(reference), q)).max() < 0.04
    for view, (blur_p, solarize_p) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        rate = lambda f, view=view: np.mean([f(d[view]) for d in draws])  # noqa: E731
        for p, observed in [
            (crop.flip_p, rate(lambda v: v.flip)),
            (crop.jitter_p, rate(lambda v: bool(v.order))),
            (crop.grayscale_p, rate(lambda v: v.grayscale)),
            (blur_p, rate(lambda v: v.blur)),
            (solarize_p, rate(lambda v: v.solarize)),
        ]:
            assert abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (view, p, observed)
        sigmas = [d[view].sigma for d in draws if d[view].blur]
        assert crop.blur_sigma[0] <= min(sigmas) and max(sigmas) <= crop.blur_sigma[1]
    orders = {d[0].order for d in draws if d[0].order}
    assert len(orders) == 24  # every jitter order occurs


# --- the pixels ----------------------------------------------------------------------------------------------------


def test_dali_applies_every_colour_op_like_torchvision(tmp_path: Path) -> None:
    """Crops that keep the whole image (no resampling): what is left is the colour ops, which must agree exactly
    but for a rare level of float rounding. Global view 0 is always blurred, view 1 always solarized, locals grey."""
    spec = write(tmp_path, [{"__key__": f"s{i:03d}", "png": encode(smooth_image(i, 20, 20), "PNG")} for i in range(24)])
    whole = {"scale": "[1.0,1.0]", "ratio": "[1.0,1.0]", "size": 20, "jitter_p": 1.0, "flip_p": 0.5}
    overrides = {f"augment.{group}.{k}": v for group in ("global_crops", "local_crops") for k, v in whole.items()}
    cfg = tiny_config(
        tmp_path,
        spec,
        **overrides,
        **{
            "augment.global_crops.blur_p": "[1.0,0.0]",
            "augment.global_crops.solarize_p": "[0.0,1.0]",
            "augment.local_crops.count": 2,
            "augment.local_crops.grayscale_p": 1.0,
            "augment.local_crops.hue": 0.5,
            "augment.local_crops.blur_p": "[0.0]",
        },
    )
    dali_loader, cpu_loader = loaders(cfg, spec, 12)
    diffs = level_diffs(list(dali_loader), list(cpu_loader))
    assert diffs.max() <= 2 and (diffs > 0.5).float().mean() < 1e-3


@pytest.mark.parametrize("side", [75, 96])
def test_dali_blur_is_the_cpu_blur_at_real_kernel_sizes(side: int, tmp_path: Path) -> None:
    """Whole-image crops at the image's size, every view blurred (kernel 9 at 75 px, 11 at 96): DALI's separable
    blur and the CPU's agree within the colour-op test's tolerance, odd and even sides."""
    samples = [{"__key__": f"s{i:03d}", "png": encode(smooth_image(i, side, side), "PNG")} for i in range(4)]
    spec = write(tmp_path, samples)
    whole = {"scale": "[1.0,1.0]", "ratio": "[1.0,1.0]", "size": side, "jitter_p": 0.0, "grayscale_p": 0.0}
    overrides = {f"augment.global_crops.{k}": v for k, v in whole.items()}
    cfg = tiny_config(
        tmp_path,
        spec,
        **overrides,
        **{"augment.global_crops.blur_p": "[1.0]", "augment.global_crops.solarize_p": "[0.0]"},
    )
    dali_loader, cpu_loader = loaders(cfg, spec, 4)
    diffs = level_diffs(list(dali_loader), list(cpu_loader))
    assert diffs.max() <= 2 and (diffs > 0.5).float().mean() < 1e-3


def test_dali_views_match_the_cpu_renderer_on_the_real_recipe(mixed_dir: str, tmp_path: Path) -> None:
    """The same crops, flips, jitter, grey, blur and solarize: only resampling differs, by about a level."""
    cfg = tiny_config(
        tmp_path,
        mixed_dir,
        **{
            "augment.global_crops.blur_p": "[1.0,0.1]",
            "augment.global_crops.solarize_p": "[0.0,0.2]",
            "augment.local_crops.count": 2,
            "augment.local_crops.size": 8,
        },
    )
    dali_loader, cpu_loader = loaders(cfg, mixed_dir, 16)
    a, b = list(dali_loader), list(cpu_loader)
    diffs = level_diffs(a, b)
    assert diffs.mean() < 0.3 and (diffs > 1.5).float().mean() < 0.02 and torch.quantile(diffs, 0.999) <= 8
    for group in ("global_views", "local_views"):  # per-channel statistics of the views
        x = torch.cat([v for batch in a for v in getattr(batch, group)])
        y = torch.cat([v for batch in b for v in getattr(batch, group)])
        assert torch.allclose(x.mean((0, 2, 3)), y.mean((0, 2, 3)), atol=0.01)
        assert torch.allclose(x.std((0, 2, 3)), y.std((0, 2, 3)), rtol=0.02)
        assert abs(x.min() - y.min()) < 0.05 and abs(x.max() - y.max()) < 0.05


# --- order, resume, determinism ------------------------------------------------------------------------------------


def test_order_resume_and_determinism(mixed_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config(tmp_path, mixed_dir)
    catalog = ShardCatalog.from_spec(mixed_dir)
    with caplog.at_level(logging.WARNING, logger="ssltrain.data.loaders.dali"):
        full_loader = build_dali_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed), CPU)
    assert isinstance(full_loader, DaliLoader) and "CPU mode" in caplog.text
    full = list(full_loader)
    torch_ids = [
        b.index.tolist() for b in build_train_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed), CPU)
    ]
    assert [b.index.tolist() for b in full] == torch_ids and len(full) == 6
    assert all(torch.equal(b.label, b.index % 4) for b in full)

    def same(xs: list, ys: list) -> bool:
        return len(xs) == len(ys) and all(
            torch.equal(x.index, y.index) and all(torch.equal(u, v) for u, v in zip(x.global_views, y.global_views))
            for x, y in zip(xs, ys)
        )

    assert same(list(full_loader), full)  # a second pass renders the same views
    resumed = DaliLoader(cfg, catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed, start=3 * 8, end=6 * 8), None)
    assert same(list(resumed), full[3:])
    threaded = tiny_config(tmp_path, mixed_dir, **{"data.workers": 2})  # 2 DALI threads and 2 host workers
    assert same(list(DaliLoader(threaded, catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed), None)), full)


# --- bad samples ---------------------------------------------------------------------------------------------------


def reasons(skipped: list[str]) -> list[str]:
    return sorted(re.sub(r" at 0x[0-9a-f]+", "", s) for s in skipped)  # PIL names its BytesIO by address


def bad_png_crc() -> bytes:
    data = bytearray(encode(smooth_image(99, 16, 16), "PNG"))
    data[data.index(b"IDAT") + 6] ^= 0xFF  # a flipped byte in the compressed data: the chunk CRC no longer matches
    return bytes(data)


def pil_encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    good = [
        {
            "__key__": f"g{i:03d}",
            ("jpg" if i % 2 else "png"): encode(smooth_image(i, 24, 24), "JPEG" if i % 2 else "PNG"),
            "cls": i % 3,
        }
        for i in range(14)
    ]
    jpeg = encode(smooth_image(50, 24, 24), "JPEG")
    bad = [
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) - 60], "cls": 1},  # header intact, scan cut
        {"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "cls": 1},
        {"__key__": "zero", "png": b"", "cls": 1},
        {"__key__": "noimage", "cls": 1},
        {"__key__": "badcrc", "png": bad_png_crc(), "cls": 1},
        {
            "__key__": "palette",
            "png": pil_encode(Image.fromarray(smooth_image(51, 24, 24)).convert("P"), "PNG"),
            "cls": 2,
        },
        # modes DALI is not trusted with: the CPU renderer renders them, in their place in the batch
        {
            "__key__": "deep16",
            "png": pil_encode(Image.fromarray(smooth_image(52, 24, 24)[..., 0].astype(np.uint16) * 200), "PNG"),
            "cls": 2,
        },
        {
            "__key__": "cmyk",
            "jpg": pil_encode(Image.fromarray(smooth_image(53, 24, 24)).convert("CMYK"), "JPEG"),
            "cls": 2,
        },
    ]
    return write(tmp_path_factory.mktemp("damaged"), good[:7] + bad + good[7:])


def test_corrupt_and_missing_images_are_skipped_and_reported_like_the_cpu_path(
    damaged_dir: str, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path, damaged_dir, **{"data.batch_size": 22})
    dali_loader, cpu_loader = loaders(cfg, damaged_dir, 22)
    (a,), (b,) = list(dali_loader), list(cpu_loader)
    assert reasons(a.skipped) == reasons(b.skipped) and len(a.skipped) >= 4
    for key in ("truncated", "garbage", "zero", "noimage"):
        assert sum(f":{key}: " in s for s in a.skipped) == 1, key
    assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label) and a.batch_size == 22 - len(a.skipped)
    keys = ShardCatalog.from_spec(damaged_dir).keys
    assert {"deep16", "cmyk", "palette"} <= {keys[i] for i in a.index.tolist()}
    assert level_diffs([a], [b]).mean() < 0.3


def test_a_batch_dali_cannot_decode_is_rendered_on_the_cpu(
    damaged_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dali, "_dali_decodes_like_pil", lambda img, data: True)  # the truncated JPEG reaches DALI
    cfg = tiny_config(tmp_path, damaged_dir, **{"data.batch_size": 22})
    dali_loader, cpu_loader = loaders(cfg, damaged_dir, 22, position_masks(cfg.seed, 22))
    with caplog.at_level(logging.WARNING, logger="ssltrain.data.loaders.dali"):
        (a,), (b,) = list(dali_loader), list(cpu_loader)
    assert "rendering it on the CPU" in caplog.text
    assert reasons(a.skipped) == reasons(b.skipped) and torch.equal(a.index, b.index)
    assert all(torch.equal(u, v) for u, v in zip(a.global_views, b.global_views))
    # The truncated JPEG got masks in the worker, then was skipped on the CPU: its row is gone, the rest in order.
    assert torch.equal(a.masks["position"], a.position) and torch.equal(b.masks["position"], b.position)
    assert torch.equal(a.masks["noise"], b.masks["noise"]) and a.masks["noise"].shape == (a.batch_size,)


# --- the trainer, and the fallback ---------------------------------------------------------------------------------


def test_training_with_the_dali_loader_writes_checkpoints(mixed_dir: str, tmp_path: Path) -> None:
    from ssltrain.engine.checkpoint import Checkpointer
    from ssltrain.engine.loop import train
    from ssltrain.eval.metrics_log import read_metrics

    run_dir = train(
        tiny_config(tmp_path, mixed_dir, **{"data.loader": "dali", "steps": 3, "checkpoint.every": 3, "threads": 1})
    )
    assert Checkpointer(run_dir / "checkpoints").latest().name == "step-3"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_without_dali_the_cpu_loader_is_used_with_a_warning(
    mixed_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")] + ["nvidia.dali"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import nvidia.dali` now raises ImportError
    cfg = tiny_config(tmp_path, mixed_dir, **{"data.loader": "dali"})
    catalog = ShardCatalog.from_spec(mixed_dir)
    with caplog.at_level(logging.WARNING, logger="ssltrain.data.loaders.dali"):
        loader = build_train_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed), CPU)
    assert not isinstance(loader, DaliLoader)
    assert "cannot be imported" in caplog.text and "pip install nvidia-dali" in caplog.text
    reference = build_train_loader(
        tiny_config(tmp_path, mixed_dir), catalog, GlobalBatchSampler(len(catalog), 8, cfg.seed), CPU
    )
    for x, y in zip(loader, reference):
        assert torch.equal(x.index, y.index) and torch.equal(x.global_views[0], y.global_views[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_views_live_on_the_device_and_match_cpu_mode(mixed_dir: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, mixed_dir, **{"augment.local_crops.count": 2, "augment.local_crops.size": 8})
    catalog = ShardCatalog.from_spec(mixed_dir)
    loader = build_dali_loader(cfg, catalog, GlobalBatchSampler(len(catalog), 16, cfg.seed), torch.device("cuda", 0))
    assert isinstance(loader, DaliLoader)
    gpu = list(loader)
    cpu = list(DaliLoader(cfg, catalog, GlobalBatchSampler(len(catalog), 16, cfg.seed), None))
    assert all(v.is_cuda and v.dtype == torch.float32 for batch in gpu for v in batch.global_views + batch.local_views)
    moved = [batch.to(CPU) for batch in gpu]
    diffs = level_diffs(moved, cpu)  # nvJPEG and the GPU resampler may round differently from the CPU ones
    assert diffs.mean() < 0.5 and (diffs > 2.5).float().mean() < 0.02
    for group in ("global_views", "local_views"):
        x = torch.cat([v for batch in moved for v in getattr(batch, group)])
        y = torch.cat([v for batch in cpu for v in getattr(batch, group)])
        assert torch.allclose(x.mean((0, 2, 3)), y.mean((0, 2, 3)), atol=0.01)
        assert torch.allclose(x.std((0, 2, 3)), y.std((0, 2, 3)), rtol=0.02)
