"""Ingesting user image folders: labels, original bytes, skipped corrupt files, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssltrain.data.ingest.folders import imagefolder_samples, unlabeled_samples
from ssltrain.data.shards import DataError, iter_members, read_index, write_shards


def _image_bytes(fmt: str, seed: int, size: tuple[int, int] = (20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write(root / "cat" / "b.png", _image_bytes("PNG", 1))
    _write(root / "cat" / "a.jpg", _image_bytes("JPEG", 2))
    _write(root / "cat" / "nested" / "deep" / "c.jpeg", _image_bytes("JPEG", 3))
    _write(root / "dog" / "d.JPG", _image_bytes("JPEG", 4))
    _write(root / "dog" / "broken.jpg", b"this is not a jpeg at all" * 10)
    _write(root / "dog" / "notes.txt", b"not an image")
    _write(root / "dog" / "e.webp", _image_bytes("WEBP", 5))
    _write(root / "dog" / "misnamed.png", _image_bytes("JPEG", 6))  # JPEG content, .png name
    _write(root / "emu" / "f.bmp", _image_bytes("BMP", 7))
    _write(root / ".ipynb_checkpoints" / "g.jpg", _image_bytes("JPEG", 8))  # hidden: no class
    _write(root / "cat" / ".h.jpg", _image_bytes("JPEG", 9))  # hidden file: ignored
    return root


def test_imagefolder_labels_bytes_and_skips(tree: Path):
    classes, samples = imagefolder_samples(tree)
    assert classes == ["cat", "dog", "emu"]
    assert len(samples) == 8  # candidates by extension, .txt and hidden left out
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        got = list(samples)
    assert samples.skipped == 1 and samples.yielded == 7
    assert samples.skipped_files[0][0] == tree / "dog" / "broken.jpg"

    # sorted walk: a.jpg, b.png, nested/deep/c.jpeg | broken (skipped), d.JPG, e.webp, misnamed.png | f.bmp
    expected = [
        ("cat/a.jpg", 0, "jpg"),
        ("cat/b.png", 0, "png"),
        ("cat/nested/deep/c.jpeg", 0, "jpg"),
        ("dog/d.JPG", 1, "jpg"),
        ("dog/e.webp", 1, "webp"),
        ("dog/misnamed.png", 1, "jpg"),  # stored under the format found in the bytes
        ("emu/f.bmp", 2, "bmp"),
    ]
    assert [(s["cls"], next(k for k in s if k not in ("__key__", "cls"))) for s in got] == [
        (label, ext) for _, label, ext in expected
    ]
    for s, (rel, _, ext) in zip(got, expected):
        assert s[ext] == (tree / rel).read_bytes()  # original bytes, not re-encoded
    keys = [s["__key__"] for s in got]
    assert keys[0] == "00000_000000000" and keys[3] == "00001_000000004"  # broken.jpg keeps position 3
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)

    _, again = imagefolder_samples(tree)
    with pytest.warns(UserWarning):
        assert list(again) == got  # deterministic


def test_imagefolder_round_trip_through_shards(tree: Path, tmp_path: Path):
    classes, samples = imagefolder_samples(tree)
    with pytest.warns(UserWarning):
        paths = write_shards(samples, tmp_path / "shards", "user", max_count=4)
    assert len(paths) == 2
    entries = [item for p in paths for item in iter_members(read_index(p))]
    assert len(entries) == 7
    labels = [int(data["cls"]) for _, data in entries]
    assert labels == [0, 0, 0, 1, 1, 1, 2]
    entry, data = entries[1]
    assert entry.key == "00000_000000001"
    assert data["png"] == (tree / "cat" / "b.png").read_bytes()


def test_unlabeled_recursive(tree: Path):
    samples = unlabeled_samples(tree / "cat")
    got = list(samples)
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "000000002"]
    assert all("cls" not in s for s in got)
    assert got[2]["jpg"] == (tree / "cat" / "nested" / "deep" / "c.jpeg").read_bytes()
    assert samples.skipped == 0

    everything = unlabeled_samples(tree)
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        assert len(list(everything)) == 7
    assert everything.skipped == 1


def test_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist") as err:
        imagefolder_samples(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        unlabeled_samples(tmp_path / "nope")
    _write(tmp_path / "file.jpg", _image_bytes("JPEG", 0))
    with pytest.raises(DataError, match="not a folder"):
        imagefolder_samples(tmp_path / "file.jpg")


def test_no_class_folders(tmp_path: Path):
    _write(tmp_path / "flat" / "a.jpg", _image_bytes("JPEG", 0))
    with pytest.raises(DataError, match="no class subfolders") as err:
        imagefolder_samples(tmp_path / "flat")
    assert "root/<class>/<images>" in str(err.value)
    # the same flat folder is fine as unlabelled data
    assert len(list(unlabeled_samples(tmp_path / "flat"))) == 1


def test_no_images(tmp_path: Path):
    root = tmp_path / "empty"
    _write(root / "a" / "readme.txt", b"hi")
    (root / "b").mkdir()
    with pytest.raises(DataError, match="hold no image files"), pytest.warns(UserWarning, match="holds no images"):
        imagefolder_samples(root)
    with pytest.raises(DataError, match="no image files"):
        unlabeled_samples(root)


def test_loose_images_warned(tmp_path: Path):
    root = tmp_path / "r"
    _write(root / "a" / "x.png", _image_bytes("PNG", 0))
    _write(root / "stray.jpg", _image_bytes("JPEG", 1))
    with pytest.warns(UserWarning, match=r"stray\.jpg"):
        classes, samples = imagefolder_samples(root)
    assert classes == ["a"] and len(list(samples)) == 1


def test_all_corrupt_is_an_error(tmp_path: Path):
    _write(tmp_path / "r" / "a" / "x.jpg", b"garbage")
    _, samples = imagefolder_samples(tmp_path / "r")
    with pytest.raises(DataError, match="could be read"), pytest.warns(UserWarning, match=r"x\.jpg"):
        list(samples)
