"""The sample stream: order independent of ranks/workers, exact resume, index format, random access."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes

from ssltrain.config import AugmentConfig, CropConfig
from ssltrain.data.augment import CPURenderer
from ssltrain.data.loaders.cpu import AugmentedShards, make_loader
from ssltrain.data.order import StreamOrder, permute
from ssltrain.data.shards import index_path_for, read_index, scan_tar
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog, sample_seed

SHARDS = np.array([9, 14, 0, 11, 16])
PINNED_EPOCH_0 = [7, 5, 2, 3, 0, 4, 9, 8, 6, 1]
PINNED_STREAMS = [35, 46, 10, 19, 37, 47, 9, 21, 34, 48, 32, 18]  # 50 samples in shards of uneven sizes, one empty


def layouts() -> list[StreamOrder]:
    """One stream and one window (a global shuffle), streams with whole-span windows, streams with small windows."""
    return [StreamOrder(SHARDS, s, w, seed=3) for s, w in ((1, 0), (4, 0), (4, 5), (6, 3))]


def global_batches(order: StreamOrder | int, batch: int, world: int, start: int = 0, end: int | None = None):
    """Reassemble global batches from every rank's share, as lists of (id, position) in position order."""
    per_rank = [list(GlobalBatchSampler(order, batch, 3, start, end, rank=r, world_size=world)) for r in range(world)]
    return [
        sorted(sum((per_rank[r][b] for r in range(world)), []), key=lambda x: x[1]) for b in range(len(per_rank[0]))
    ]


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_global_batches_do_not_depend_on_world_size(world: int) -> None:
    for order in layouts():
        reference = global_batches(order, 12, 1, end=12 * 10)
        assert global_batches(order, 12, world, end=12 * 10) == reference


def test_each_epoch_is_a_permutation_without_repeats() -> None:
    batch = 12
    for order in layouts():
        per_epoch = (order.samples // batch) * batch
        batches = global_batches(order, batch, 2, end=per_epoch * 3)
        ids = [i for b in batches for i, _ in b]
        epochs = [ids[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
        for e in epochs:
            assert len(set(e)) == per_epoch  # no sample twice within an epoch (the remainder is dropped)
        assert epochs[0] != epochs[1]  # reshuffled every epoch
        positions = [p for b in batches for _, p in b]
        assert positions == list(range(per_epoch * 3))


def test_resume_at_any_batch_boundary_continues_the_same_sequence() -> None:
    for order in layouts():
        full = global_batches(order, 12, 1, end=12 * 9)
        for k in (1, 4, 5, 8):
            assert global_batches(order, 12, 2, start=12 * k, end=12 * 9) == full[k:]


def test_streams_read_their_spans_window_by_window_and_ranks_own_streams() -> None:
    """A stream's k-th window holds consecutive samples of the epoch's shard order; with W dividing the streams,
    rank r reads the streams s % W == r only: each shard on one rank."""
    order = StreamOrder(SHARDS, 4, 5, seed=3)
    shard_of = np.repeat(np.arange(len(SHARDS)), SHARDS)
    positions = np.arange(order.samples)
    ids = order.sample_ids(0, positions)
    laid_out = np.concatenate([np.arange(SHARDS[:i].sum(), SHARDS[: i + 1].sum()) for i in order._epoch_layout(0)[0]])
    rank = {}
    for s in range(4):
        stream = ids[positions % 4 == s]
        span = laid_out[s * order.span : (s + 1) * order.span]
        for w in range(0, order.span, 5):
            assert sorted(stream[w : w + 5]) == sorted(span[w : w + 5])  # a window's samples, shuffled
        for shard in set(shard_of[stream]):
            rank.setdefault(int(shard), set()).add(s % 2)
    assert sum(len(r) > 1 for r in rank.values()) <= 3  # only shards cut by a span boundary are shared


def test_order_is_a_function_of_seed_epoch_and_stream_settings() -> None:
    def ids(*args: int, epoch: int = 2) -> list[int]:
        return StreamOrder(SHARDS, *args).sample_ids(epoch, np.arange(48)).tolist()

    assert ids(4, 5, 7) == ids(4, 5, 7)
    assert ids(4, 5, 7) != ids(4, 5, 8)
    assert ids(4, 5, 7) != ids(4, 5, 7, epoch=3)
    assert ids(4, 5, 7) != ids(2, 5, 7) != ids(4, 6, 7)
    assert StreamOrder(SHARDS, 1, 0, 7, shuffle=False).sample_ids(0, np.arange(50)).tolist() == list(range(50))


def test_permute_is_a_bijection_of_any_size() -> None:
    for size in (1, 2, 3, 5, 17, 64, 100, 1000, 4097):
        image = permute(np.arange(size), np.full(size, size), np.full(size, 12345))
        assert sorted(image.tolist()) == list(range(size))


def test_order_and_augmentation_seeds_are_pinned_across_library_versions() -> None:
    # Written down once: a checkpoint saved under one numpy/torch release must resume in the same order under another.
    order = StreamOrder(np.array([10]), 1, 0, 0)
    assert order.sample_ids(0, np.arange(10)).tolist() == PINNED_EPOCH_0
    assert StreamOrder(SHARDS, 4, 5, 0).sample_ids(1, np.arange(12)).tolist() == PINNED_STREAMS
    assert sample_seed(3, 12345) == 2407876349502696976


def test_a_billion_samples_cost_nothing_per_sample() -> None:
    """100,000 shards of 10,000 samples: the order holds O(shards) state and maps any batch of positions at once."""
    order = StreamOrder(np.full(100_000, 10_000), 64, 50_000, seed=0)
    ids = order.sample_ids(3, np.arange(4096) + 10**8)
    assert len(set(ids.tolist())) == 4096 and ids.max() < 10**9


def test_sampler_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="not divisible by the world size"):
        GlobalBatchSampler(50, 12, 0, world_size=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(10, 12, 0)
    with pytest.raises(ValueError, match="batch boundary"):
        GlobalBatchSampler(50, 12, 0, start=5)


def test_index_is_dali_v12_and_reused(shard_dir: Path) -> None:
    tar = sorted(shard_dir.glob("*.tar"))[0]
    lines = index_path_for(tar).read_text().splitlines()
    assert lines[0] == "v1.2 20"
    fields = lines[1].split()
    assert len(fields) == 8 and {fields[0], fields[4]} == {"png", "cls"}
    assert read_index(tar).samples == scan_tar(tar).samples
    # the offsets point at the member data
    entry = read_index(tar).samples[3]
    with open(tar, "rb") as f:
        f.seek(entry.components["png"].offset)
        assert f.read(entry.components["png"].size) == png_bytes(3)


def test_index_rebuilt_when_missing(shard_dir: Path) -> None:
    tar = sorted(shard_dir.glob("*.tar"))[1]
    idx = index_path_for(tar)
    expected = idx.read_text()
    idx.unlink()
    catalog = ShardCatalog.from_spec(str(shard_dir))
    assert len(catalog) == 53
    assert idx.read_text() == expected


def test_catalog_random_access(shard_dir: Path) -> None:
    catalog = ShardCatalog.from_spec(str(shard_dir / "*.tar"))
    assert len(catalog) == 53 and catalog.has_labels
    for i in (0, 19, 20, 52):
        raw = catalog.read(i)
        assert raw.key == f"s{i:06d}" and raw.image == png_bytes(i) and raw.label == i % 5
    assert catalog.labels().tolist() == [i % 5 for i in range(53)]


def _render_spec() -> AugmentConfig:
    crop = CropConfig(count=2, size=12, scale=[0.3, 1.0], blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])
    return AugmentConfig(
        global_crops=crop, local_crops=CropConfig(count=2, size=8, scale=[0.1, 0.4], blur_p=[0.5], solarize_p=[0.0])
    )


def _batches(catalog: ShardCatalog, workers: int, start: int = 0, world: int = 1, rank: int = 0):
    sampler = GlobalBatchSampler(len(catalog), 8, 11, start=start, end=8 * 8, rank=rank, world_size=world)
    loader = make_loader(AugmentedShards(catalog, CPURenderer(_render_spec()), 11), workers, batch_sampler=sampler)
    return list(loader)


def test_views_do_not_depend_on_workers_and_resume_exactly(shard_dir: Path) -> None:
    catalog = ShardCatalog.from_spec(str(shard_dir))
    serial = _batches(catalog, 0)
    parallel = _batches(catalog, 2)
    resumed = _batches(catalog, 2, start=8 * 5)
    assert len(serial) == 8 and [v.global_views[0].shape for v in serial[:1]] == [torch.Size([8, 3, 12, 12])]
    assert serial[0].local_views[1].shape == (8, 3, 8, 8)
    for a, b in zip(serial, parallel):
        assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
        for va, vb in zip(a.global_views + a.local_views, b.global_views + b.local_views):
            assert torch.equal(va, vb)
    for a, b in zip(serial[5:], resumed):
        assert torch.equal(a.index, b.index)
        assert all(torch.equal(va, vb) for va, vb in zip(a.global_views, b.global_views))
    # two views of one sample differ (they are augmented independently)
    assert not torch.equal(serial[0].global_views[0], serial[0].global_views[1])


def test_rank_shares_reassemble_the_single_process_batch(shard_dir: Path) -> None:
    """Rank r holds the positions p % W == r: interleaved, the ranks' views are the single process's, bit for bit."""
    catalog = ShardCatalog.from_spec(str(shard_dir))
    single = _batches(catalog, 0)
    ranks = [_batches(catalog, 0, world=2, rank=r) for r in range(2)]
    for b, whole in enumerate(single):
        joined = torch.empty_like(whole.global_views[1])
        for r in range(2):
            joined[r::2] = ranks[r][b].global_views[1]
            assert torch.equal(ranks[r][b].position, whole.position[r::2])
        assert torch.equal(joined, whole.global_views[1])


def test_fewer_samples_than_streams_make_a_stream_a_sample() -> None:
    order = StreamOrder(np.array([3, 1]), 8, 0, seed=1)
    assert order.streams == 4 and sorted(order.sample_ids(0, np.arange(4)).tolist()) == [0, 1, 2, 3]


# --- the catalog keeps per-shard state only -------------------------------------------------------------------------


def test_keys_are_read_on_demand_with_the_same_meaning(shard_dir: Path) -> None:
    catalog = ShardCatalog.from_spec(str(shard_dir))
    keys = catalog.keys
    assert (
        len(keys) == 53
        and keys[20] == "s000020"
        and keys[-1] == "s000052"
        and keys[18:21]
        == [
            "s000018",
            "s000019",
            "s000020",
        ]
    )
    assert list(keys) == [f"s{i:06d}" for i in range(53)] and keys.index("s000040") == 40
    assert catalog.key(0) == "s000000" and catalog.read(40).key == "s000040"


def test_start_up_reads_the_manifest_not_the_indexes(shard_dir: Path) -> None:
    """With a manifest listing the shards, start-up opens no index: a garbled one is found (and its samples skipped
    and named) only when a sample of it is read."""
    import warnings

    from ssltrain.data.manifest import write_manifest

    write_manifest(shard_dir)
    garbled = index_path_for(sorted(shard_dir.glob("*.tar"))[1])
    garbled.write_text("v1.2 20\n" + "nonsense\n" * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped or warned about at start-up
        catalog = ShardCatalog.from_spec(str(shard_dir))
    assert len(catalog) == 53 and catalog.shard_counts().tolist() == [20, 20, 13]
    assert catalog.read(5).key == "s000005" and catalog.read(5).image == png_bytes(5)
    bad = catalog.read(25)
    assert bad.image is None and "train-part1.idx' line 2 is malformed" in bad.problem
    assert catalog.read(45).image == png_bytes(45)


def _synthetic_shards(root: Path, shards: int, per_shard: int) -> None:
    """Index files of ``per_shard`` samples (png + cls) beside sparse tars of the right size: what start-up reads."""
    for s in range(shards):
        lines = [f"v1.2 {per_shard}"]
        off = 512
        for j in range(per_shard):
            name = f"sample{s:04d}_{j:07d}"
            lines.append(f"png {off} 3000 {name}.png cls {off + 3584} 1 {name}.cls")
            off += 3584 + 1024
        (root / f"train-{s:04d}.idx").write_text("\n".join(lines) + "\n")
        with open(root / f"train-{s:04d}.tar", "wb") as f:
            f.truncate(off + 1024)


def test_the_catalog_holds_per_shard_state_only(tmp_path: Path) -> None:
    """Start-up builds nothing per sample (retained memory does not grow with the samples), and a process keeps a
    bounded number of parsed indexes however many shards it reads."""
    import tracemalloc

    _synthetic_shards(tmp_path, 6, 20_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    catalog = ShardCatalog.from_spec(str(tmp_path))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(catalog) == 120_000 and held < 64 << 10, held  # the old catalog: ~1 KB a sample, over 100 MB here
    assert catalog.key(7) == "sample0000_0000007"
    table = catalog._tables[0]
    assert table.nbytes < 80 * 20_000  # numpy arrays and one buffer of keys, no object per sample
    catalog.TABLE_BYTES = 2 * table.nbytes
    assert [catalog.key(s * 20_000 + 7) for s in range(6)] == [f"sample{s:04d}_0000007" for s in range(6)]
    assert list(catalog._tables) == [4, 5]
