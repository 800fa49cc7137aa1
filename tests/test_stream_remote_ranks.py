"""World-size independence over a remote store: shards in moto's S3 server on loopback (through s3fs), read through
one shard cache shared by the ranks and smaller than an epoch, loader workers on, gloo ranks under torchrun.

Checks: the global batches of 1, 2 and 4 ranks are the same samples, key for key, across an epoch boundary; a run
stopped on 4 ranks mid-epoch and resumed on 2 sees the same batches and ends with the same parameters as one
uninterrupted process reading the same S3 data; no sample is skipped and the cache stays within its limit.

One in-process run is the reference for both. 4 ranks run steps 0-4 (the epoch boundary is at step 4), 2 ranks
resume at step 5, in the middle of each stream's first shard of epoch 1; another run has 2 ranks from the start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_shards, tiny_config
from servers import moto_s3
from test_distributed_training import VIT, assert_close, params, torchrun, write_config

from ssltrain.config import load_config
from ssltrain.core.checkpoint_layout import read_meta
from ssltrain.data.manifest import write_manifest
from ssltrain.data.record import read_global_batches
from ssltrain.data.store import StoreOptions, filesystem
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics

pytest.importorskip("s3fs")
pytest.importorskip("moto")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BUCKET = "ranks"
SHARDS, PER_SHARD = 8, 8  # 64 samples: 4 global batches of 16 an epoch
STEPS, STOP = 8, 5  # two epochs; the 4-rank run stops after 5 steps (position 80: epoch 1, 4 samples into each stream)
DATA = {
    "data.batch_size": 16,
    "data.streams": 4,  # a multiple of 1, 2 and 4: each stream's two shards are read by one rank an epoch
    "data.shuffle_window": PER_SHARD,  # a stream shuffles within one shard at a time
    "data.workers": 1,
    "data.record_samples": True,
    "steps": STEPS,
    "checkpoint.every": 4,
    "data.store.retries": 6,
    "data.store.backoff_s": 0.02,
    "data.store.timeout_s": 5.0,
}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ranks-set") / "set"
    root.mkdir()
    make_shards(root, [PER_SHARD] * SHARDS)
    write_manifest(root)
    return root


@pytest.fixture(scope="module")
def s3(shard_set: Path):
    """moto's S3 server with the set uploaded to s3://ranks/set/; yields the endpoint URL. Its dummy credentials are
    in this process's environment while it runs, so the torchrun processes started meanwhile inherit them."""
    with moto_s3() as endpoint:
        fs = filesystem("s3://", StoreOptions(endpoint_url=endpoint))
        fs.mkdir(BUCKET)
        for f in shard_set.iterdir():
            fs.put_file(str(f), f"{BUCKET}/set/{f.name}")
        yield endpoint


def _cache_limit(shard_set: Path) -> int:
    """Two and a half shards: less than half an epoch, so shards are evicted and fetched again."""
    return int(2.5 * max(p.stat().st_size for p in shard_set.glob("*.tar")))


def _settings(shard_set: Path, s3: str, cache: Path) -> dict[str, object]:
    return {
        **VIT,
        **DATA,
        "data.store.endpoint_url": s3,
        "data.store.cache_dir": str(cache),
        "data.store.cache_bytes": _cache_limit(shard_set),
    }


SPEC = f"s3://{BUCKET}/set"


@pytest.fixture(scope="module")
def single(shard_set: Path, s3: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, uninterrupted, reading the same S3 data through its own cache."""
    tmp = tmp_path_factory.mktemp("single")
    return train(tiny_config(tmp, SPEC, **_settings(shard_set, s3, tmp / "cache")))


@pytest.fixture(scope="module")
def two_ranks(shard_set: Path, s3: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("two")
    config, cfg = write_config(tmp, "two", SPEC, **_settings(shard_set, s3, tmp / "cache"))
    torchrun(config, 2)
    return cfg.run_dir


@pytest.fixture(scope="module")
def four_then_two(shard_set: Path, s3: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 ranks stop after step 5 (a checkpoint mid-epoch); 2 ranks resume it to the end. The ranks of each share
    one cache directory, as the ranks of a node do."""
    tmp = tmp_path_factory.mktemp("resumed")
    config, cfg = write_config(tmp, "resumed", SPEC, **_settings(shard_set, s3, tmp / "cache"))
    torchrun(config, 4, "--stop-after-steps", str(STOP))
    meta = read_meta(cfg.run_dir / f"checkpoints/step-{STOP}")
    assert meta["world_size"] == 4 and meta["data_position"] == STOP * 16
    torchrun(config, 2)
    return cfg.run_dir


def _ranks_per_step(run_dir: Path) -> dict[int, list[int]]:
    """Which ranks recorded each step's keys (so which world size ran it)."""
    seen: dict[int, set[int]] = {}
    for path in (run_dir / "samples").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault(rec["step"], set()).add(rec["rank"])
    return {step: sorted(ranks) for step, ranks in sorted(seen.items())}


def _clean(run_dir: Path, shard_set: Path) -> None:
    """Every step logged, no sample skipped, and the shared cache within its limit, smaller than an epoch."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["data_skipped"] == 0
    cache = Path(load_config(str(run_dir / "config.yaml"), []).data.store.cache_dir)
    held = [p.stat().st_size for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")]
    epoch = sum(p.stat().st_size for p in shard_set.glob("*.tar"))
    assert 0 < sum(held) <= _cache_limit(shard_set) < epoch / 2


def test_global_batches_are_the_same_on_1_2_and_4_ranks(
    single: Path, two_ranks: Path, four_then_two: Path, shard_set: Path
) -> None:
    reference = read_global_batches(single)
    assert sorted(reference) == [(step, 0) for step in range(STEPS)]
    assert all(len(keys) == 16 for keys in reference.values())
    epochs = [{k for step in range(e * 4, e * 4 + 4) for k in reference[(step, 0)]} for e in range(2)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == SHARDS * PER_SHARD  # every sample once an epoch
    assert reference[(0, 0)] != reference[(4, 0)]  # epoch 1 is another order

    assert _ranks_per_step(two_ranks) == {step: [0, 1] for step in range(STEPS)}
    assert read_global_batches(two_ranks) == reference
    four = _ranks_per_step(four_then_two)
    assert [step for step, ranks in four.items() if ranks == [0, 1, 2, 3]] == list(range(STOP))
    resumed = read_global_batches(four_then_two)
    assert [resumed[(step, 0)] for step in range(STOP)] == [reference[(step, 0)] for step in range(STOP)]
    _clean(two_ranks, shard_set)
    assert_close(params(two_ranks), params(single))


def test_a_run_stopped_on_4_ranks_resumes_on_2_as_one_uninterrupted_process(
    single: Path, four_then_two: Path, shard_set: Path
) -> None:
    assert _ranks_per_step(four_then_two) == {step: [0, 1, 2, 3] if step < STOP else [0, 1] for step in range(STEPS)}
    assert read_global_batches(four_then_two) == read_global_batches(single)
    meta = read_meta(four_then_two / f"checkpoints/step-{STEPS}")
    assert meta["world_size"] == 2 and meta["data_position"] == STEPS * 16
    _clean(four_then_two, shard_set)
    assert_close(params(four_then_two), params(single))
