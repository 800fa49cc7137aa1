"""The embedded datasets: deterministic, balanced, well-formed, shardable - and shapes defeats raw pixels."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ssltrain.data.embedded import (
    DIGITS_TRAIN,
    EMBEDDED,
    SHAPES_CLASSES,
    _digits_split,
    digits_samples,
    shapes_samples,
)
from ssltrain.data.shards import iter_members, read_index, write_shards


def _decode(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    assert img.mode == "RGB"
    return np.asarray(img)


def _pixels(samples) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*((_decode(s["png"]), s["cls"]) for s in samples))
    return np.stack(xs).astype(np.float32) / 255.0, np.array(ys)


def _raw_knn_accuracy(train, test, k: int = 20) -> float:
    """kNN (cosine, majority vote) on per-channel normalised raw pixels."""
    (xtr, ytr), (xte, yte) = train, test
    mean, std = xtr.mean(axis=(0, 1, 2)), xtr.std(axis=(0, 1, 2))

    def feats(x: np.ndarray) -> np.ndarray:
        f = ((x - mean) / std).reshape(len(x), -1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    nearest = np.argsort(-(feats(xte) @ feats(xtr).T), axis=1)[:, :k]
    votes = np.stack([np.bincount(row, minlength=int(ytr.max()) + 1) for row in ytr[nearest]])
    return float((votes.argmax(axis=1) == yte).mean())


def test_shapes_deterministic_and_splits_differ():
    a = list(shapes_samples("train", 30, seed=3))
    b = list(shapes_samples("train", 30, seed=3))
    assert a == b
    other_seed = list(shapes_samples("train", 30, seed=4))
    val = list(shapes_samples("val", 30, seed=3))
    train_pngs = {s["png"] for s in a}
    assert not train_pngs & {s["png"] for s in other_seed}
    assert not train_pngs & {s["png"] for s in val}
    # a prefix of a longer run is the shorter run: count does not reshuffle what comes first
    assert list(shapes_samples("train", 10, seed=3)) == a[:10]


def test_shapes_format_keys_and_balance():
    samples = list(shapes_samples("train", 105, seed=0))
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) == 105
    assert all("." not in k and "/" not in k for k in keys)
    assert keys[0] == "train-0000000"
    for s in samples[:10]:
        assert set(s) == {"__key__", "png", "cls"}
        assert _decode(s["png"]).shape == (32, 32, 3)
    counts = Counter(s["cls"] for s in samples)
    assert set(counts) == set(range(len(SHAPES_CLASSES)))
    assert set(counts.values()) <= {10, 11}  # balanced to within one
    big = next(shapes_samples("val", 1, size=48))
    assert _decode(big["png"]).shape == (48, 48, 3)
    assert list(shapes_samples("train", 0)) == []
    with pytest.raises(ValueError):
        list(shapes_samples("train", -1))


def test_shapes_images_vary():
    """Backgrounds and fills change from image to image: no two images (or mean colours) are alike."""
    x, _ = _pixels(shapes_samples("train", 50, seed=1))
    means = x.mean(axis=(1, 2))
    assert np.unique(np.round(means, 2), axis=0).shape[0] == 50
    assert x.std(axis=(1, 2)).mean() > 0.05  # not flat colour patches


def test_raw_pixels_are_poor_features_on_shapes():
    """The dataset's purpose: pixel-space neighbours must not find the class (chance is 0.1)."""
    acc = _raw_knn_accuracy(_pixels(shapes_samples("train", 1000)), _pixels(shapes_samples("val", 300)))
    assert acc < 0.35, f"raw-pixel kNN on shapes reached {acc:.3f}; the nuisance factors no longer hide the class"


def test_raw_knn_works_on_digits():
    """Control for the test above: the same kNN does find the class where pixels are good features."""
    acc = _raw_knn_accuracy(_pixels(digits_samples("train")), _pixels(digits_samples("val")))
    assert acc > 0.85


def test_digits_split_sizes_disjoint_stratified():
    train_idx, target = _digits_split("train", seed=0)
    val_idx, _ = _digits_split("val", seed=0)
    assert len(train_idx) == DIGITS_TRAIN == 1200 and len(val_idx) == 597
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1797))
    per_class = np.bincount(target[train_idx], minlength=10)
    expected = np.bincount(target, minlength=10) * 1200 / 1797
    assert np.all(np.abs(per_class - expected) < 1)
    other, _ = _digits_split("train", seed=1)
    assert set(other.tolist()) != set(train_idx.tolist())


def test_digits_samples():
    train = list(digits_samples("train", size=24))
    assert len(train) == 1200
    assert train == list(digits_samples("train", size=24))
    keys = [s["__key__"] for s in train]
    assert len(set(keys)) == 1200 and all("." not in k and "/" not in k for k in keys)
    assert {s["cls"] for s in train} == set(range(10))
    img = _decode(train[0]["png"])
    assert img.shape == (24, 24, 3)
    assert np.array_equal(img[..., 0], img[..., 1])  # gray replicated into RGB
    assert img.max() > 128  # strokes survive the upscaling
    assert sum(1 for _ in digits_samples("val")) == 597
    with pytest.raises(ValueError):
        next(digits_samples("test"))


def test_registry():
    assert EMBEDDED["shapes"].classes == SHAPES_CLASSES
    assert len(list(EMBEDDED["shapes"].samples("val", 3))) == 3
    assert EMBEDDED["digits"].split_sizes == {"train": 1200, "val": 597}


def test_round_trip_through_shards(tmp_path):
    samples = list(shapes_samples("train", 25)) + list(digits_samples("val"))[:5]
    paths = write_shards(iter(samples), tmp_path, "emb", max_count=10)
    assert [p.name for p in paths] == [f"emb-{i:06d}.tar" for i in range(3)]
    got = []
    for path in paths:
        index = read_index(path)
        assert not index.truncated
        got.extend(iter_members(index))
    assert [entry.key for entry, _ in got] == [s["__key__"] for s in samples]
    for (_, data), s in zip(got, samples):
        assert data["png"] == s["png"]
        assert int(data["cls"]) == s["cls"]
