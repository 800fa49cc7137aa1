"""``ssltrain shards``: shards of a target size, written in parallel, resumable after a crash; ``shards verify``."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssltrain.cli import main
from ssltrain.data.ingest.folders import imagefolder_samples, unlabeled_samples
from ssltrain.data.ingest.images import TAR_MEMBER_OVERHEAD, ShardSize, ingest_folder
from ssltrain.data.shards import DataError, index_path_for, iter_members, read_index, write_shards
from ssltrain.data.stream import ShardCatalog
from ssltrain.data.verify import verify_shard, verify_shards


def image_tree(root: Path, per_class: int, classes: int = 3, side: int = 24, bad: int = 0) -> Path:
    """A class-folder tree of random-noise JPEGs (incompressible, so file sizes are predictable), plus bad files."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)
    for i in range(bad):
        (root / "class0" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def shard_contents(out: Path, prefix: str = "train") -> list[tuple[str, dict[str, bytes]]]:
    return [(e.key, d) for p in sorted(out.glob(f"{prefix}-*.tar")) for e, d in iter_members(read_index(p))]


def test_shard_size_is_a_count_or_a_byte_size() -> None:
    assert ShardSize.parse("10000") == ShardSize(samples=10000)
    assert ShardSize.parse("1GB") == ShardSize(bytes=1 << 30)
    assert ShardSize.parse("500MB") == ShardSize(bytes=500 << 20)
    assert ShardSize.parse("1.5g") == ShardSize(bytes=int(1.5 * (1 << 30)))
    assert ShardSize.parse("64KiB") == ShardSize(bytes=64 << 10)
    for bad in ("0", "lots", "12 parsecs", "-3"):
        with pytest.raises(DataError, match="--shard-size"):
            ShardSize.parse(bad)


def test_byte_sized_shards_stay_under_the_target_and_hold_every_image_in_order(tmp_path: Path) -> None:
    tree = image_tree(tmp_path / "in", per_class=12)
    target = 16 << 10
    report = ingest_folder(imagefolder_samples(tree)[1], tmp_path / "out", "train", ShardSize(bytes=target), workers=1)
    assert report.samples == 36 and not report.skipped and len(report.shards) > 2
    largest_file = max(p.stat().st_size for p in tree.rglob("*.jpg")) + 3 * TAR_MEMBER_OVERHEAD
    for shard in report.shards:
        assert shard.stat().st_size <= target + largest_file, shard
    # Same samples and keys, in the same order, as the one-stream writer.
    write_shards(imagefolder_samples(tree)[1], tmp_path / "stream", "train", max_count=1000)
    assert [k for k, _ in shard_contents(tmp_path / "out")] == [k for k, _ in shard_contents(tmp_path / "stream")]


def test_parallel_writers_give_the_same_shards_byte_for_byte(tmp_path: Path) -> None:
    tree = image_tree(tmp_path / "in", per_class=10, bad=2)
    one = ingest_folder(unlabeled_samples(tree), tmp_path / "one", "u", ShardSize(samples=7), workers=1)
    two = ingest_folder(unlabeled_samples(tree), tmp_path / "two", "u", ShardSize(samples=7), workers=2)
    assert len(one.skipped) == len(two.skipped) == 2 and one.samples == two.samples == 30
    assert [p.name for p in one.shards] == [p.name for p in two.shards]
    for a, b in zip(one.shards, two.shards):
        assert a.read_bytes() == b.read_bytes()
        assert index_path_for(a).read_text() == index_path_for(b).read_text()


def test_rerun_keeps_finished_shards_and_rewrites_missing_and_damaged_ones(tmp_path: Path) -> None:
    tree = image_tree(tmp_path / "in", per_class=8)
    reference = ingest_folder(unlabeled_samples(tree), tmp_path / "ref", "train", ShardSize(samples=5))
    out = tmp_path / "out"
    first = ingest_folder(unlabeled_samples(tree), out, "train", ShardSize(samples=5))
    shards = first.shards
    # What an interruption leaves: a shard never renamed into place, one cut short, a partial temporary file.
    shards[1].unlink()
    index_path_for(shards[1]).unlink()
    with open(shards[3], "r+b") as f:
        f.truncate(shards[3].stat().st_size // 2)
    (out / ".train-000004.tar.tmp-12345").write_bytes(b"partial")
    again = ingest_folder(unlabeled_samples(tree), out, "train", ShardSize(samples=5))
    assert sorted(p.name for p in again.written) == [shards[1].name, shards[3].name]
    assert len(again.kept) == len(shards) - 2
    assert not list(out.glob(".*.tmp-*"))
    for a, b in zip(reference.shards, again.shards):
        assert a.read_bytes() == b.read_bytes()


def test_a_changed_tree_is_refused_with_the_fix(tmp_path: Path) -> None:
    tree = image_tree(tmp_path / "in", per_class=4)
    ingest_folder(unlabeled_samples(tree), tmp_path / "out", "train", ShardSize(samples=5))
    Image.new("RGB", (9, 9)).save(tree / "class1" / "new.jpg")
    with pytest.raises(DataError, match="different input tree.*write to a new --out"):
        ingest_folder(unlabeled_samples(tree), tmp_path / "out", "train", ShardSize(samples=5))


def test_killed_ingest_resumes_to_the_same_shards(tmp_path: Path) -> None:
    """SIGKILL the real command mid-way, rerun it: the result equals an uninterrupted run's, byte for byte."""
    tree = image_tree(tmp_path / "in", per_class=60, side=48)
    command = [
        sys.executable,
        "-m",
        "ssltrain.cli",
        "shards",
        "imagefolder",
        str(tree),
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--out",
    ]
    subprocess.run(command + [str(tmp_path / "ref")], check=True, capture_output=True)
    reference = sorted((tmp_path / "ref").glob("train-*.tar"))
    out = tmp_path / "out"
    proc = subprocess.Popen(command + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("train-*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(out.glob("train-*.tar")))
    assert 3 <= partial < len(reference), "the ingest finished before it could be killed; make the tree larger"
    assert main(["shards", "imagefolder", str(tree), "--shard-size", "4", "--workers", "2", "--out", str(out)]) == 0
    resumed = sorted(out.glob("train-*.tar"))
    assert [p.name for p in resumed] == [p.name for p in reference]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(reference, resumed))
    assert main(["shards", "verify", str(out)]) == 0


def damaged_set(out: Path) -> dict[str, Path]:
    """One shard per kind of damage, each named after it."""
    good = lambda i: {"__key__": f"k{i:03d}", "png": _png(i), "cls": i % 3}  # noqa: E731
    write_shards([good(i) for i in range(4)], out / "g", "good")
    bad_members = [
        good(10),
        {"__key__": "k011", "jpg": b"\xff\xd8\xff\xe0 corrupt"},
        {"__key__": "k012", "cls": 1},
        {"__key__": "k013", "png": _png(13), "cls": "seven"},
        {"__key__": "k014", "txt": "a caption"},
    ]
    write_shards(bad_members, out / "m", "members")
    write_shards([good(i) for i in range(20, 24)], out / "t", "truncated")
    write_shards([good(i) for i in range(30, 33)], out / "x", "noindex")
    write_shards([good(i) for i in range(40, 43)], out / "s", "staleindex")
    for sub in ("g", "m", "t", "x", "s"):
        for p in (out / sub).iterdir():
            p.rename(out / p.name)
    paths = {p.name.split("-")[0]: p for p in out.glob("*.tar")}
    last = read_index(paths["truncated"]).samples[-1].components["png"]
    with open(paths["truncated"], "r+b") as f:
        f.truncate(last.offset + last.size // 2)  # cut inside the last image
    index_path_for(paths["noindex"]).unlink()
    stale = index_path_for(paths["staleindex"])
    stale.write_text(stale.read_text().replace("v1.2 3", "v1.2 2").rsplit("\n", 2)[0] + "\n")
    (out / "empty-000000.tar").write_bytes(b"")
    paths["empty"] = out / "empty-000000.tar"
    return paths


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, 10, 20)).save(buf, format="PNG")
    return buf.getvalue()


def test_verify_names_every_kind_of_damage(tmp_path: Path) -> None:
    paths = damaged_set(tmp_path)
    report = verify_shards(str(tmp_path), workers=2)
    problems = {name: verify_shard(path).problems for name, path in paths.items()}
    assert report.problems == [f"{c.path}: {p}" for c in report.shards for p in c.problems]
    assert problems["good"] == []
    assert len(problems["members"]) == 4
    assert any("k011: image does not decode" in p for p in problems["members"])
    assert any("k012: no image or video member" in p for p in problems["members"])
    assert any("k013: label b'seven' is not an integer" in p for p in problems["members"])
    assert any("k014: no image or video member (has: txt)" in p for p in problems["members"])
    assert any("truncated" in p for p in problems["truncated"])
    assert problems["noindex"] == [
        "no index 'noindex-000000.idx' (DALI and fast start need it); write it with --fix-index"
    ]
    assert any(
        "rebuild it with --fix-index" in p or "or rebuild it with --fix-index" in p for p in problems["staleindex"]
    )
    assert problems["empty"] == ["the shard is empty (0 bytes); re-write it"]
    # --fix-index repairs what an index can repair, and nothing else.
    fixed = verify_shards(str(tmp_path), fix_index=True)
    assert not verify_shard(paths["noindex"]).problems and not verify_shard(paths["staleindex"]).problems
    assert fixed.samples == report.samples
    assert verify_shard(paths["truncated"]).problems


def test_fix_index_indexes_the_whole_samples_of_a_truncated_shard(tmp_path: Path) -> None:
    """A truncated shard: --fix-index writes the index of its whole samples (the loader then reads them, and only
    them), and the truncation stays a problem to fix by re-writing. A shard with no whole sample gets no hint to
    run --fix-index, which could index nothing."""
    good = lambda i: {"__key__": f"k{i:03d}", "png": _png(i), "cls": i % 3}  # noqa: E731
    (cut,) = write_shards([good(i) for i in range(4)], tmp_path / "cut", "cut")
    (empty,) = write_shards([good(9)], tmp_path / "empty", "empty")
    image = read_index(cut).samples[2].components["png"]
    with open(cut, "r+b") as f:
        f.truncate(image.offset + image.size // 2)
    with open(empty, "r+b") as f:
        f.truncate(read_index(empty).samples[0].components["png"].offset + 10)

    before = verify_shard(cut).problems
    assert "the tar is truncated: 2 whole samples before the cut; re-write it" in before
    assert "index lists 4 samples, the tar holds 2; rebuild it with --fix-index" in before
    fixed = verify_shard(cut, fix_index=True)
    assert fixed.problems == [
        "the tar is truncated: 2 whole samples before the cut; re-write it (its index now lists those 2)"
    ]
    assert [s.key for s in read_index(cut).samples] == ["k000", "k001"]
    assert verify_shard(cut).problems == ["the tar is truncated: 2 whole samples before the cut; re-write it"]
    catalog = ShardCatalog.from_spec(str(cut))
    assert len(catalog) == 2 and all(catalog.read(i).image is not None for i in range(2))

    assert verify_shard(empty).problems == ["the tar is truncated: 0 whole samples before the cut; re-write it"]


def test_verify_cli_exits_1_and_prints_each_problem(tmp_path: Path, capsys) -> None:
    damaged_set(tmp_path)
    assert main(["shards", "verify", str(tmp_path / "members-*.tar"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "k011: image does not decode" in out and "4 problems in 1 shards" in out
    assert main(["shards", "verify", str(tmp_path / "good-*.tar")]) == 0
    assert "1 shards, 4 samples: all good" in capsys.readouterr().out


def test_shards_cli_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["shards", "verify"]) == 2
    assert "give the shards to check" in capsys.readouterr().err
    assert main(["shards", "unlabeled", str(tmp_path)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["shards", "video", "--out", str(tmp_path)]) == 2
    assert "give the input folder" in capsys.readouterr().err
