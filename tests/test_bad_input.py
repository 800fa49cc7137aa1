"""Bad input: each case gets a clear message naming the file, or is skipped and counted."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
from conftest import make_shards

from ssltrain.config import AugmentConfig, CropConfig
from ssltrain.data.augment import CPURenderer
from ssltrain.data.loaders.cpu import AugmentedShards, collate_views
from ssltrain.data.shards import DataError, expand_shards, index_path_for, scan_tar, write_shards
from ssltrain.data.stream import ShardCatalog


def render_all(catalog: ShardCatalog):
    """Push every sample through the training dataset; return the collated batch (bad ones are in .skipped)."""
    spec = AugmentConfig(
        global_crops=CropConfig(size=8, blur_p=[0.0], solarize_p=[0.0]), local_crops=CropConfig(count=0)
    )
    dataset = AugmentedShards(catalog, CPURenderer(spec), seed=0)
    return collate_views([dataset[(i, i)] for i in range(len(catalog))])


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shard '.*nope.tar' \(data.train\) does not exist"):
        expand_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(DataError, match=r"no shards match '.*train-\*.tar'"):
        expand_shards(str(tmp_path / "train-*.tar"))
    with pytest.raises(DataError, match="holds no .tar shards"):
        expand_shards(str(tmp_path))
    with pytest.raises(DataError, match="no shards given for 'eval.val'"):
        expand_shards("  ", "eval.val")


def test_brace_ranges_and_lists(tmp_path: Path) -> None:
    make_shards(tmp_path, [3, 3, 3])
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert [p.name for p in expand_shards(str(tmp_path / "train-part{0..2}.tar"))] == names
    assert len(expand_shards(f"{tmp_path / names[0]},{tmp_path / names[2]}")) == 2


def test_empty_shard_is_skipped_with_a_warning_naming_it(tmp_path: Path) -> None:
    make_shards(tmp_path, [5])
    (tmp_path / "train-empty.tar").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"train-empty.tar' is skipped: it is empty \(0 bytes\)"):
        catalog = ShardCatalog.from_spec(str(tmp_path))
    assert len(catalog) == 5


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no readable samples"):
            ShardCatalog.from_spec(str(tmp_path))
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file at all" * 40)
    with (
        pytest.warns(UserWarning, match=r"b.tar' is skipped"),
        pytest.raises(DataError, match=r"no readable samples.*b.tar': it cannot be read .*not a readable tar file"),
    ):
        ShardCatalog.from_spec(str(tmp_path / "b.tar"))


def test_training_on_a_damaged_shard_set_skips_and_counts_every_case(tmp_path: Path) -> None:
    """Every kind of damage in one shard set: the run finishes, metrics.jsonl counts what was lost."""
    from conftest import png_bytes, tiny_config

    from ssltrain.engine.loop import train

    good = [{"__key__": f"g{i:03d}", "png": png_bytes(i, 16), "cls": i % 5} for i in range(40)]
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "cls": 1},
        {"__key__": "zero", "png": b"", "cls": 1},
        {"__key__": "noimage", "cls": 1},
        {"__key__": "caption", "txt": b"a caption but no picture", "cls": 1},
    ]
    data = tmp_path / "data"
    write_shards(good[:20] + bad, data / "a", "a")
    write_shards(good[20:], data / "b", "b")
    for p in [*(data / "a").iterdir(), *(data / "b").iterdir()]:
        p.rename(data / p.name)
    truncated = data / "b-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (data / "empty.tar").write_bytes(b"")
    (data / "garbage.tar").write_bytes(b"not a tar" * 200)
    (data / "folder.tar").mkdir()  # matches *.tar but cannot be opened as a file
    cfg = tiny_config(tmp_path, str(data), steps=6, **{"checkpoint.every": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = train(cfg)
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 6 and last["data_shards_skipped"] == 3
    # Exactly the bad samples the stream reached: corrupt, zero-byte, no image, caption-only, and past the cut.
    from ssltrain.data.loaders.cpu import Skipped, read_decoded
    from ssltrain.data.stream import GlobalBatchSampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog = ShardCatalog.from_spec(str(data))
    bad_ids = {i for i in range(len(catalog)) if isinstance(read_decoded(catalog, i), Skipped)}
    assert len(bad_ids) >= 4 + 5  # the four bad members, and at least a quarter of the truncated shard
    order = catalog.stream_order(cfg.data.streams, cfg.data.shuffle_window, cfg.seed)
    reached = [sid for batch in GlobalBatchSampler(order, 8, end=48) for sid, _ in batch]
    assert last["data_skipped"] == sum(sid in bad_ids for sid in reached) > 0


def test_truncated_shard_with_its_index_skips_and_counts_the_lost_samples(tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, [10])
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])  # cut mid-file; the index still lists all 10
    with pytest.warns(UserWarning, match=r"train-part0.tar' is truncated"):
        catalog = ShardCatalog.from_spec(str(tar))
    batch = render_all(catalog)
    assert batch.batch_size + len(batch.skipped) == 10
    assert 3 <= batch.batch_size <= 6
    assert all("truncated" in s and "train-part0.tar" in s for s in batch.skipped)


def test_truncated_shard_without_index_recovers_the_intact_prefix(tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, [10])
    index_path_for(tar).unlink()
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="truncated"):
        catalog = ShardCatalog.from_spec(str(tar))
    assert 3 <= len(catalog) <= 6  # whole samples before the cut; the one cut in half is dropped
    assert not index_path_for(tar).exists()  # a partial index is never cached for a damaged shard
    assert render_all(catalog).skipped == []


def image_first_shard(out: Path) -> tuple[Path, dict[str, tarfile.TarInfo]]:
    """Four samples whose first member is the image (``jpg`` sorts before ``json``), and the tar's members by name."""
    samples = [{"__key__": f"k{i}", "jpg": bytes(2000 + i), "json": b'{"i": %d}' % i} for i in range(4)]
    (tar,) = write_shards(samples, out, "cut")
    with tarfile.open(tar) as f:
        return tar, {m.name: m for m in f}


@pytest.mark.parametrize(
    ("where", "whole"),
    [
        (lambda m: m["k2.jpg"].offset_data + 1000, 2),  # in the data of the next sample's first member
        (lambda m: m["k2.jpg"].offset_data - 300, 2),  # in its header, after the name field
        (lambda m: m["k2.json"].offset_data + 3, 2),  # in the sample's second member: that sample goes
        (lambda m: m["k2.jpg"].offset_data - 500, 1),  # before the name field: k1 may go on, so it goes too
        (lambda m: m["k1.json"].offset_data + 512, 1),  # between samples: the same, for the same reason
    ],
    ids=["first-member-data", "first-member-header", "second-member", "name-cut", "boundary"],
)
def test_a_cut_drops_only_the_sample_it_falls_in(tmp_path: Path, where, whole: int) -> None:
    tar, members = image_first_shard(tmp_path)
    cut = where(members)
    tar.write_bytes(tar.read_bytes()[:cut])
    index = scan_tar(tar)
    assert index.truncated and [s.key for s in index.samples] == [f"k{i}" for i in range(whole)]
    assert all(set(s.components) == {"jpg", "json"} for s in index.samples)


def test_a_tar_cut_in_its_end_marker_is_whole(tmp_path: Path) -> None:
    tar, members = image_first_shard(tmp_path)
    end = members["k3.json"].offset_data + 512  # the end-of-archive blocks follow the last member
    tar.write_bytes(tar.read_bytes()[: end + 100])
    index = scan_tar(tar)
    assert not index.truncated and len(index.samples) == 4


def test_bad_members_are_skipped_and_counted(tmp_path: Path) -> None:
    samples: list[dict] = [
        {"__key__": "ok", "png": _png(), "cls": 1},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "cls": 1},
        {"__key__": "zero", "png": b"", "cls": 1},
        {"__key__": "noimage", "txt": b"a caption but no picture", "cls": 1},
        {"__key__": "badlabel", "png": _png(), "cls": "seven"},
    ]
    write_shards(samples, tmp_path / "bad", "train")
    catalog = ShardCatalog.from_spec(str(tmp_path / "bad"))
    batch = render_all(catalog)
    assert batch.batch_size == 1
    assert len(batch.skipped) == 4
    for key, why in (
        ("corrupt", "cannot decode"),
        ("zero", "cannot decode"),
        ("noimage", "no image"),
        ("badlabel", "not an integer"),
    ):
        (entry,) = [s for s in batch.skipped if f"train-000000.tar:{key}: " in s]
        assert why in entry


def test_malformed_index_names_the_index(tmp_path: Path) -> None:
    (tar,) = make_shards(tmp_path, [3])
    index_path_for(tar).write_text("v1.2 7\ngarbage\n")
    with pytest.raises(DataError, match=r"train-part0.idx' is not a v1.2 index.*delete it"):
        ShardCatalog.from_spec(str(tar))


def test_cli_reports_a_missing_shard_path_and_exits_2(tmp_path: Path) -> None:
    cfg = Path(__file__).parent.parent / "configs" / "demo.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssltrain.cli",
            "train",
            str(cfg),
            f"data.train={tmp_path}/none-*.tar",
            f"out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: no shards match" in proc.stderr and "none-*.tar" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "ssltrain.cli", "train", str(cfg), "optim.lr=fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "bad value for 'optim.lr'" in proc.stderr


def _png() -> bytes:
    from conftest import png_bytes

    return png_bytes(0, 8)
