"""The ``ssltrain shards`` command on every source, read back through the catalog."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ssltrain.cli import main
from ssltrain.data.stream import ShardCatalog


def _image_tree(root: Path, classes: dict[str, int]) -> None:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.new("RGB", (20, 12), (40 * i, 10 * j, 90)).save(root / name / f"img{j}.jpg")


def test_shards_imagefolder_keeps_labels_and_classes(tmp_path: Path) -> None:
    _image_tree(tmp_path / "in", {"cat": 3, "dog": 4})
    assert main(["shards", "imagefolder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--shard-size", "3"]) == 0
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["cat", "dog"]
    catalog = ShardCatalog.from_spec(str(tmp_path / "out"))
    assert len(catalog.paths) == 3 and len(catalog) == 7
    assert sorted(catalog.labels().tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert catalog.read(0).image == (tmp_path / "in/cat/img0.jpg").read_bytes()  # original bytes, not re-encoded


def test_shards_unlabeled_and_embedded(tmp_path: Path) -> None:
    _image_tree(tmp_path / "in", {"a": 2, "b": 1})
    assert main(["shards", "unlabeled", str(tmp_path / "in"), "--out", str(tmp_path / "u")]) == 0
    unlabeled = ShardCatalog.from_spec(str(tmp_path / "u"))
    assert len(unlabeled) == 3 and not unlabeled.has_labels
    assert main(["shards", "shapes", "--out", str(tmp_path / "s"), "--train", "30", "--val", "10", "--size", "24"]) == 0
    assert len(ShardCatalog.from_spec(str(tmp_path / "s/train-*.tar"))) == 30
    assert len(ShardCatalog.from_spec(str(tmp_path / "s/val-*.tar"))) == 10
    assert main(["shards", "digits", "--out", str(tmp_path / "d")]) == 0
    assert len(ShardCatalog.from_spec(str(tmp_path / "d/train-*.tar"))) == 1200


def test_shards_errors_exit_2_with_the_path(tmp_path: Path, capsys) -> None:
    assert main(["shards", "imagefolder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["shards", "unlabeled", "--out", str(tmp_path / "o")]) == 2
    assert "give the input folder" in capsys.readouterr().err
