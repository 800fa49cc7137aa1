"""The CPU renderer's fast paths: the separable Gaussian blur against torchvision's 2-D one, and the per-sample
generator (views a function of (seed, position), no global random state touched)."""

from __future__ import annotations

import time

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssltrain.config import AugmentConfig, CropConfig
from ssltrain.data.augment import CPURenderer, SampleRandom, gaussian_blur, resized_crop_box

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("height,width,kernel", [(224, 224, 23), (96, 96, 11), (37, 50, 5), (20, 33, 9), (8, 9, 3)])
def test_separable_blur_is_torchvisions_within_one_level(height: int, width: int, kernel: int) -> None:
    image = noise((3, height, width), height * width)
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0):
        ours = gaussian_blur(image, kernel, sigma)
        reference = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        assert ours.dtype == torch.uint8 and ours.shape == image.shape
        diff = (ours.int() - reference.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (sigma, diff.max(), (diff > 0).float().mean())
    frames = noise((4, 3, height, width), 1)  # leading dimensions: the video path's frames
    assert torch.equal(gaussian_blur(frames, kernel, 1.3)[2], gaussian_blur(frames[2], kernel, 1.3))
    smooth = image.float()  # float images are blurred without rounding
    assert torch.allclose(
        gaussian_blur(smooth, kernel, 1.3), TF.gaussian_blur(smooth, [kernel, kernel], [1.3, 1.3]), atol=1e-3
    )


def test_separable_blur_is_several_times_faster_at_224() -> None:
    image = noise((3, 224, 224), 0)

    def best(f) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: gaussian_blur(image, 23, 1.5))
    reference = best(lambda: TF.gaussian_blur(image, [23, 23], [1.5, 1.5]))
    assert ours < 0.5 * reference, (ours, reference)


def test_sample_generator_is_the_samples_own() -> None:
    renderer = CPURenderer(AugmentConfig(local_crops=CropConfig(count=2, size=8, scale=[0.05, 0.4])))
    state = torch.random.get_rng_state()
    a = renderer.draw(30, 40, SampleRandom.of(3, 17))
    torch.manual_seed(12345)  # the global generator plays no part
    b = renderer.draw(30, 40, SampleRandom.of(3, 17))
    assert a == b and a != renderer.draw(30, 40, SampleRandom.of(3, 18))
    torch.random.set_rng_state(state)
    image = noise((3, 30, 40), 2)
    renderer(image, SampleRandom.of(3, 17))
    assert torch.equal(torch.random.get_rng_state(), state)  # drawing and rendering leave it untouched


def test_the_draw_helpers_cover_their_ranges() -> None:
    rng = SampleRandom(0)
    values = [rng.integer(2, 5) for _ in range(2000)]
    assert set(values) == {2, 3, 4}
    perms = {tuple(rng.permutation(4)) for _ in range(2000)}
    assert len(perms) == 24
    assert all(0.0 <= rng.random() < 1.0 for _ in range(200))
    # a crop box always lies in the image, also where every try fails (the central crop clamped to the ratio)
    for height, width in [(30, 40), (5, 300), (300, 5)]:
        for _ in range(200):
            top, left, h, w = resized_crop_box(height, width, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width and h > 0 and w > 0
