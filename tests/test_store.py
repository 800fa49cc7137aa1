"""The shard storage layer against real servers on loopback: nginx (HTTP, range requests), moto's S3 server driven
through s3fs, and a fault proxy in front of nginx that drops connections mid-body, answers 503, or stalls.

Checks: remote bytes equal the local shard's; faults are retried to the same bytes in bounded time; a shard that is
gone fails at once; a stalled server is abandoned after the timeout; the cache (smaller than the set, eviction,
kill -9 mid-download, sha256 mismatch, processes sharing it); the manifest written by ``ssltrain shards`` and
``shards verify --fix-index``, and read back locally and remotely with clear errors; a training run from nginx, from
moto's S3 and through the fault proxy (with a cache smaller than the data) equals the run from local disk batch for
batch; the sampler prefetches the shards ahead; a shard gone from the store is skipped and counted.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import make_shards
from servers import FaultProxy, moto_s3, nginx

from ssltrain.cli import main as cli_main
from ssltrain.config import load_config
from ssltrain.data.manifest import (
    MANIFEST_NAME,
    ManifestError,
    manifest_for_spec,
    read_manifest,
    sha256_file,
    write_manifest,
)
from ssltrain.data.shard_cache import ShardCache, ShardChecksumError, ShardRef
from ssltrain.data.store import ShardReader, ShardUnavailable, StoreOptions, filesystem, read_shard

pytest.importorskip("s3fs")
pytest.importorskip("moto")

CHUNK = 128 << 10
FAST = StoreOptions(retries=5, backoff_s=0.02, timeout_s=0.5, chunk_bytes=CHUNK)
BUCKET = "shards"


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 3-4 noise PNGs at 200 px (about 120 KB each, so a shard spans several chunks)."""
    root = tmp_path_factory.mktemp("store") / "set"
    root.mkdir()
    make_shards(root, [4, 4, 4, 3], size=200)
    write_manifest(root)
    return root


@pytest.fixture(scope="module")
def http(shard_set: Path, tmp_path_factory: pytest.TempPathFactory):
    with nginx(shard_set, tmp_path_factory.mktemp("nginx")) as base:
        yield base


@pytest.fixture(scope="module")
def s3(shard_set: Path):
    """moto's S3 server with the shard set uploaded to s3://shards/set/; yields the endpoint URL."""
    with moto_s3() as endpoint:
        fs = filesystem("s3://", StoreOptions(endpoint_url=endpoint))
        fs.mkdir(BUCKET)
        for f in shard_set.iterdir():
            if f.is_file() and not f.name.startswith("."):
                fs.put_file(str(f), f"{BUCKET}/set/{f.name}")
        yield endpoint


def _proxy(http: str, **kw: object) -> FaultProxy:
    host, port = http.removeprefix("http://").split(":")
    return FaultProxy((host, int(port)), **kw)  # type: ignore[arg-type]


def _tars(shard_set: Path) -> list[Path]:
    return sorted(shard_set.glob("*.tar"))


def test_remote_reads_equal_local(shard_set: Path, http: str, s3: str) -> None:
    opts_s3 = StoreOptions(endpoint_url=s3, chunk_bytes=CHUNK)
    for tar in _tars(shard_set):
        want = tar.read_bytes()
        assert len(want) > 2 * CHUNK
        assert read_shard(f"{http}/{tar.name}", FAST) == want
        assert read_shard(f"s3://{BUCKET}/set/{tar.name}", opts_s3) == want
        assert read_shard(f"file://{tar}", FAST) == want
        assert read_shard(str(tar), FAST) == want
        k = len(want) // 3 + 17  # a resume from a byte offset (inside a chunk)
        assert read_shard(f"{http}/{tar.name}", FAST, offset=k) == want[k:]
        assert read_shard(f"s3://{BUCKET}/set/{tar.name}", opts_s3, offset=k, size=len(want)) == want[k:]
        with ShardReader(f"{http}/{tar.name}", FAST, size=len(want)) as f:  # small sequential reads
            parts = []
            while piece := f.read(50_001):
                parts.append(piece)
        assert b"".join(parts) == want
        with tarfile.open(fileobj=ShardReader(f"{http}/{tar.name}", FAST), mode="r|") as stream:  # as the streams
            members = [(m.name, stream.extractfile(m).read()) for m in stream]  # type: ignore[union-attr]
        with tarfile.open(tar) as local:
            assert members == [(m.name, local.extractfile(m).read()) for m in local]  # type: ignore[union-attr]


def _read_in_child(url: str, options: StoreOptions, size: int) -> None:
    ok = len(read_shard(url, options)) == size
    gc.collect()  # what a worker's exit does: the inherited clients' finalizers run
    os._exit(0 if ok else 1)


@pytest.mark.parametrize("store", ["http", "s3"])
def test_a_forked_worker_leaves_the_parents_connections_working(
    shard_set: Path, http: str, s3: str, store: str
) -> None:
    """A DataLoader worker is a fork of a process that has been reading: the child's copies of the clients must not
    close the parent's keep-alive connections (fsspec's finalizer did, through the event loop they share after the
    fork, and the parent's next read waited out its whole timeout: HTTP loading at 0.13x of local disk)."""
    tar = _tars(shard_set)[0]
    want = tar.read_bytes()
    if store == "http":
        url, options = f"{http}/{tar.name}", StoreOptions(timeout_s=10, chunk_bytes=CHUNK)
    else:
        url, options = f"s3://{BUCKET}/set/{tar.name}", StoreOptions(endpoint_url=s3, timeout_s=10, chunk_bytes=CHUNK)
    assert read_shard(url, options) == want  # the parent now holds an open connection to the server
    for _ in range(2):  # as two loader starts
        child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(url, options, len(want)))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        started = time.monotonic()
        assert read_shard(url, options) == want
        assert time.monotonic() - started < 3, "the parent's read waited on a connection its child closed"


def test_a_reader_closed_early_stops_its_read_ahead(shard_set: Path, http: str) -> None:
    tar = _tars(shard_set)[0]
    with ShardReader(f"{http}/{tar.name}", FAST, size=tar.stat().st_size) as f:
        assert f.read(10) == tar.read_bytes()[:10]
    deadline = time.monotonic() + 3
    while any(t.name == "shard-read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "shard-read-ahead" for t in threading.enumerate())


def test_drops_503_and_stalls_are_retried_to_the_same_bytes(shard_set: Path, http: str) -> None:
    tar = _tars(shard_set)[0]
    want = tar.read_bytes()
    with _proxy(http, drop_after=50_000) as proxy:
        proxy.faults = ["503", "503", "drop", "503", "stall", None, "drop", "503", None, "stall", "drop"]
        start = time.monotonic()
        got = read_shard(f"{proxy.url}/{tar.name}", FAST)  # the first request is the HEAD for its size
        elapsed = time.monotonic() - start
    assert got == want
    applied = [f for _, f in proxy.requests if f]
    assert applied == ["503", "503", "drop", "503", "stall", "drop", "503", "stall", "drop"]
    # the size lookup (fsspec: a HEAD, then a GET) failing with 503 is retried too
    assert [r.split()[0] for r, _ in proxy.requests[:3]] == ["HEAD", "GET", "HEAD"]
    assert elapsed < 10, f"{elapsed:.1f}s"


def test_gone_shard_fails_at_once(http: str, s3: str) -> None:
    with _proxy(http) as proxy:
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as err:
            read_shard(f"{proxy.url}/train-gone.tar", FAST, size=1000)  # the manifest's size: no HEAD
        assert len(proxy.requests) == 1  # no retry storm on a 404
        with pytest.raises(ShardUnavailable):
            read_shard(f"{proxy.url}/train-gone.tar", FAST)  # fsspec's size lookup: a HEAD, then a GET
        assert len(proxy.requests) == 3
        assert time.monotonic() - start < 2
    assert err.value.attempts == 1 and "train-gone.tar" in str(err.value)
    assert isinstance(err.value.last_error, FileNotFoundError)
    with pytest.raises(ShardUnavailable) as err:
        read_shard(f"s3://{BUCKET}/set/gone.tar", StoreOptions(endpoint_url=s3))
    assert err.value.attempts == 1 and isinstance(err.value.last_error, FileNotFoundError)
    with pytest.raises(ShardUnavailable, match="attempt"):
        read_shard("/nonexistent/shard.tar", FAST)


def test_a_shard_that_keeps_failing_raises_after_bounded_retries(shard_set: Path, http: str) -> None:
    tar = _tars(shard_set)[0]
    opts = StoreOptions(retries=3, backoff_s=0.02, timeout_s=0.5, chunk_bytes=CHUNK)
    with _proxy(http) as proxy:
        proxy.faults = ["503"] * 50
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as err:
            read_shard(f"{proxy.url}/{tar.name}", opts, size=tar.stat().st_size)
        assert time.monotonic() - start < 3
        assert len(proxy.requests) == 4
    assert err.value.attempts == 4 and f"{proxy.url}/{tar.name}" in str(err.value) and "503" in str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses worker processes whole


def test_a_stalled_server_is_abandoned_after_the_timeout(shard_set: Path, http: str) -> None:
    tar = _tars(shard_set)[0]
    opts = StoreOptions(retries=1, backoff_s=0.02, timeout_s=0.5, chunk_bytes=CHUNK)
    with _proxy(http) as proxy:
        proxy.faults = ["stall"] * 10
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as err:
            read_shard(f"{proxy.url}/{tar.name}", opts, size=tar.stat().st_size)
        elapsed = time.monotonic() - start
    assert err.value.attempts == 2
    assert 0.9 < elapsed < 4, f"{elapsed:.1f}s"  # two attempts of 0.5 s each, then given up


def _http_refs(shard_set: Path, http: str) -> list[ShardRef]:
    manifest = read_manifest(http, FAST)
    return [r for r in manifest.refs() if r.url.endswith(".tar")]


def test_cache_smaller_than_the_set_serves_every_read(shard_set: Path, http: str, tmp_path: Path) -> None:
    refs = _http_refs(shard_set, http)
    limit = int(2.5 * max(r.size or 0 for r in refs))
    with ShardCache(tmp_path / "cache", limit, FAST, workers=2) as cache:
        for epoch in range(2):
            for i, ref in enumerate(refs):
                cache.prefetch(refs[i + 1 : i + 2])
                with cache.open(ref) as f:
                    data = f.read()
                assert hashlib.sha256(data).hexdigest() == ref.sha256, (epoch, ref.url)
                assert cache.usage() <= limit
            with cache.open(refs[1], offset=1000) as f:  # an offset into a cached shard
                assert f.read() == (shard_set / Path(refs[1].url).name).read_bytes()[1000:]
        assert cache.stats["evicted"] > 0 and cache.stats["downloads"] > len(refs)
        finished = [p for p in (tmp_path / "cache").iterdir() if p.is_file() and not p.name.startswith(".")]
        assert 0 < len(finished) <= 2


def test_closing_the_cache_stops_its_prefetches(shard_set: Path, http: str, tmp_path: Path) -> None:
    with _proxy(http, slow_s=0.05) as proxy:
        refs = _http_refs(shard_set, proxy.url)
        proxy.faults = ["slow"] * 100
        cache = ShardCache(tmp_path / "cache", 1 << 30, FAST, workers=1)
        cache.prefetch(refs)
        deadline = time.monotonic() + 10
        while not proxy.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        cache.close()
        assert time.monotonic() - start < 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]


def test_a_shard_larger_than_the_cache_is_streamed(shard_set: Path, http: str, tmp_path: Path) -> None:
    ref = _http_refs(shard_set, http)[0]
    with ShardCache(tmp_path / "cache", (ref.size or 0) - 1, FAST) as cache:
        with cache.open(ref) as f:
            assert not hasattr(f, "fileno")
            assert hashlib.sha256(f.read()).hexdigest() == ref.sha256
        assert cache.stats["streamed"] == 1 and cache.path(ref) is None


def test_sha256_mismatch_is_refused(shard_set: Path, http: str, tmp_path: Path) -> None:
    ref = _http_refs(shard_set, http)[0]
    bad = ShardRef(ref.url, ref.size, "0" * 64)
    with ShardCache(tmp_path / "cache", 1 << 30, FAST) as cache:
        with pytest.raises(ShardChecksumError, match="sha256"):
            cache.open(bad)
        assert cache.path(bad) is None
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]  # nothing left, not even a temporary


_DOWNLOAD = textwrap.dedent(
    """
    import hashlib
    import sys
    sys.path.insert(0, {tests!r})
    from ssltrain.data.shard_cache import ShardCache, ShardRef
    from ssltrain.data.store import StoreOptions
    opts = StoreOptions(retries=2, backoff_s=0.02, timeout_s=5, chunk_bytes={chunk})
    cache = ShardCache({cache!r}, {limit}, opts)
    refs = [ShardRef(u, s, h) for u, s, h in {refs!r}]
    for _ in range(2):
        for ref in refs:
            with cache.open(ref) as f:
                assert hashlib.sha256(f.read()).hexdigest() == ref.sha256, ref.url
    print("ok", cache.stats)
    """
)


def _download_script(cache: Path, limit: int, refs: list[ShardRef]) -> str:
    rows = [(r.url, r.size, r.sha256) for r in refs]
    return _DOWNLOAD.format(tests=str(Path(__file__).parent), chunk=CHUNK, cache=str(cache), limit=limit, refs=rows)


def test_a_download_killed_midway_leaves_nothing_that_is_served(shard_set: Path, http: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    with _proxy(http, slow_s=0.05) as proxy:
        ref = _http_refs(shard_set, proxy.url)[0]
        proxy.faults = ["slow"] * 100
        proc = subprocess.Popen([sys.executable, "-c", _download_script(cache_dir, 1 << 30, [ref])])
        try:
            deadline = time.monotonic() + 30

            def chunks_asked() -> int:
                return sum(fault == "slow" for _, fault in proxy.requests)

            while chunks_asked() < 2 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)  # until its first chunk is written and the second on its way: mid-download
            assert chunks_asked() >= 2, proxy.requests
            assert any(p.name.endswith(".part") for p in cache_dir.iterdir())
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proxy.faults = []
        leftovers = [p.name for p in cache_dir.iterdir() if p.name != ".locks"]
        assert leftovers and all(n.startswith(".") and n.endswith(".part") for n in leftovers)  # no final name
        with ShardCache(cache_dir, 1 << 30, FAST) as cache:
            assert not any(p.name.endswith(".part") for p in cache_dir.iterdir())  # stale temporary removed
            assert cache.path(ref) is None
            with cache.open(ref) as f:
                assert hashlib.sha256(f.read()).hexdigest() == ref.sha256
            assert cache.stats["downloads"] == 1


def test_processes_sharing_a_cache_do_not_corrupt_it(shard_set: Path, http: str, tmp_path: Path) -> None:
    refs = _http_refs(shard_set, http)
    limit = int(2.5 * max(r.size or 0 for r in refs))
    script = _download_script(tmp_path / "cache", limit, refs)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert all(o.startswith("ok") for o in outs)
    held = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir() if p.is_file())
    assert held <= limit


def test_manifest_written_by_shards_and_read_back(tmp_path: Path, http: str, s3: str, shard_set: Path) -> None:
    out = tmp_path / "shapes"
    assert cli_main(["shards", "shapes", "--out", str(out), "--train", "50", "--val", "20", "--shard-size", "20"]) == 0
    manifest = read_manifest(str(out))
    tars = sorted(out.glob("*.tar"))
    assert [s.path for s in manifest.shards] == [t.name for t in tars]
    assert [s.samples for s in manifest.shards] == [20, 20, 10, 20]  # train 20+20+10, val 20
    assert all(
        s.sha256 == sha256_file(out / s.path) and s.bytes == (out / s.path).stat().st_size for s in manifest.shards
    )
    assert manifest.total_samples == 70
    assert manifest_for_spec(f"{out}/train-*.tar").total_samples == 50
    assert manifest_for_spec(f"{out}/val-{{000000..000000}}.tar,{out}/train-000002.tar").total_samples == 30
    assert read_manifest(f"file://{out}/{MANIFEST_NAME}").shards == manifest.shards

    local = read_manifest(str(shard_set))  # remote reads of a manifest: the same shards, under the store's URLs
    assert read_manifest(http, FAST).shards == local.shards
    remote = read_manifest(f"s3://{BUCKET}/set", StoreOptions(endpoint_url=s3))
    assert remote.shards == local.shards and remote.refs()[0].url == f"s3://{BUCKET}/set/{local.shards[0].path}"
    spec = manifest_for_spec(f"{http}/train-*.tar", FAST)
    assert [s.path for s in spec.shards] == [f"{http}/{s.path}" for s in local.shards]


def test_folder_ingest_writes_the_manifest(tmp_path: Path) -> None:
    from conftest import png_bytes

    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    out = tmp_path / "out"
    args = ["shards", "unlabeled", str(images), "--out", str(out), "--shard-size", "3", "--workers", "1"]
    assert cli_main(args) == 0
    manifest = read_manifest(str(out))
    assert [s.samples for s in manifest.shards] == [3, 3, 1] and manifest.total_samples == 7
    (out / manifest.shards[1].path).unlink()  # a rerun rewrites the missing shard and the manifest keeps all three
    assert cli_main(args) == 0
    assert read_manifest(str(out)).shards == manifest.shards


def test_verify_fix_index_rewrites_the_manifest(tmp_path: Path) -> None:
    make_shards(tmp_path, [5, 4, 3])
    with pytest.raises(ManifestError, match=f"no {MANIFEST_NAME} in {tmp_path}: run `ssltrain shards verify "):
        read_manifest(str(tmp_path))
    assert cli_main(["shards", "verify", str(tmp_path), "--fix-index", "--workers", "1"]) == 0
    manifest = read_manifest(str(tmp_path))
    assert [s.samples for s in manifest.shards] == [5, 4, 3]
    first = tmp_path / manifest.shards[0].path
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["shards"][0]["sha256"] = "f" * 64  # stale: shard rewritten after its manifest
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(str(tmp_path)).shards[0].sha256 == "f" * 64
    assert cli_main(["shards", "verify", str(tmp_path), "--fix-index", "--no-decode", "--workers", "1"]) == 0
    assert read_manifest(str(tmp_path)).shards[0].sha256 == sha256_file(first)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format=99), "format 99"),
        (lambda d: d.update(total_samples=1), "total_samples 1 is not the shards' sum"),
        (lambda d: d["shards"][0].update(path="../x.tar"), "not a relative path"),
        (lambda d: d["shards"][0].update(sha256="xyz"), "is not a hex digest"),
        (lambda d: d["shards"][0].update(samples=-1), "is not a count"),
    ],
)
def test_a_bad_manifest_names_the_file_and_the_fix(tmp_path: Path, edit, message: str) -> None:
    make_shards(tmp_path, [3, 2])
    write_manifest(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    edit(data)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        read_manifest(str(tmp_path))
    assert message in str(err.value) and str(tmp_path / MANIFEST_NAME) in str(err.value)
    assert "--fix-index" in str(err.value)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_manifest(str(tmp_path))


def test_store_config_section(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["data.train=x", "data.store.endpoint_url=http://127.0.0.1:9000", "data.store.cache_bytes=1000000"],
    )
    opts = StoreOptions.from_config(cfg.data.store)
    assert opts.endpoint_url == "http://127.0.0.1:9000" and opts.retries == 5 and cfg.data.store.cache_bytes == 10**6


def test_s3_faults_are_retried_to_the_same_bytes(shard_set: Path, s3: str) -> None:
    tar = _tars(shard_set)[0]
    want = tar.read_bytes()
    with _proxy(s3, drop_after=50_000) as proxy:
        opts = StoreOptions(retries=5, backoff_s=0.02, timeout_s=0.5, chunk_bytes=CHUNK, endpoint_url=proxy.url)
        proxy.faults = ["503", "drop", "stall", None, "drop", "503"]
        start = time.monotonic()
        got = read_shard(f"s3://{BUCKET}/set/{tar.name}", opts, size=len(want))
        elapsed = time.monotonic() - start
        assert [f for _, f in proxy.requests if f] == ["503", "drop", "stall", "drop", "503"]
    assert got == want and elapsed < 10, f"{elapsed:.1f}s"


# --- training from a store: the same run as from local disk, batch for batch ------------------------------------------


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 16 tiny labeled PNGs (64 samples: four batches of 16), with their manifest."""
    root = tmp_path_factory.mktemp("trainset") / "train"
    root.mkdir()
    make_shards(root, [16, 16, 16, 16])
    write_manifest(root)
    return root


@pytest.fixture(scope="module")
def train_http(train_set: Path, tmp_path_factory: pytest.TempPathFactory):
    with nginx(train_set, tmp_path_factory.mktemp("nginx-train")) as base:
        yield base


@pytest.fixture(scope="module")
def train_s3(train_set: Path, s3: str) -> str:
    """The training set uploaded to s3://shards/train/; the endpoint URL."""
    fs = filesystem("s3://", StoreOptions(endpoint_url=s3))
    for f in train_set.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{BUCKET}/train/{f.name}")
    return s3


def _train(tmp_path: Path, name: str, spec: str, **store: object) -> Path:
    from conftest import tiny_config

    from ssltrain.engine.loop import train

    overrides: dict[str, object] = {
        "steps": 4,
        "data.batch_size": 16,
        "data.workers": 1,
        "data.record_samples": True,
        "checkpoint.every": 4,
        "data.store.retries": 6,
        "data.store.backoff_s": 0.02,
        "data.store.timeout_s": 1.0,
    }
    overrides.update({f"data.store.{k}": v for k, v in store.items()})
    return train(tiny_config(tmp_path / name, spec, **overrides))


def _same_run(a: Path, b: Path) -> None:
    from conftest import assert_same_params, final_params

    from ssltrain.data.record import read_global_batches
    from ssltrain.eval.metrics_log import read_metrics

    batches = read_global_batches(a)
    assert len(batches) == 4 and all(len(keys) == 16 for keys in batches.values())
    assert read_global_batches(b) == batches
    losses = [(r["step"], r["loss"]) for r in read_metrics(a / "metrics.jsonl") if "loss" in r]
    assert (
        len(losses) == 4
        and [(r["step"], r["loss"]) for r in read_metrics(b / "metrics.jsonl") if "loss" in r] == losses
    )
    assert_same_params(final_params(a), final_params(b))


@pytest.fixture(scope="module")
def local_run(train_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same run from local disk."""
    return _train(tmp_path_factory.mktemp("local"), "local", str(train_set))


def _shard_bytes(train_set: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(train_set.glob("*.tar"))]


def _held(cache: Path) -> list[int]:
    return [p.stat().st_size for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")]


def test_training_from_http_and_s3_equals_local_disk(
    train_set: Path, train_http: str, train_s3: str, local_run: Path, tmp_path: Path
) -> None:
    http = _train(tmp_path, "http", train_http, cache_dir=str(tmp_path / "cache-http"))
    _same_run(local_run, http)
    assert sorted(_held(tmp_path / "cache-http")) == sorted(_shard_bytes(train_set))  # every shard came whole
    # S3 through a cache smaller than the data set: shards are evicted and fetched again, the run is the same
    limit = int(2.5 * max(_shard_bytes(train_set)))
    s3 = _train(
        tmp_path,
        "s3",
        f"s3://{BUCKET}/train",
        cache_dir=str(tmp_path / "cache-s3"),
        cache_bytes=limit,
        endpoint_url=train_s3,
    )
    _same_run(local_run, s3)
    held = _held(tmp_path / "cache-s3")
    assert sum(held) <= limit and len(held) < len(_shard_bytes(train_set))


def test_training_through_faults_equals_local_disk(
    train_set: Path, train_http: str, local_run: Path, tmp_path: Path
) -> None:
    limit = int(1.5 * max(_shard_bytes(train_set)))  # one shard at a time: every shard is fetched again and again
    with _proxy(train_http, drop_after=3000) as proxy:
        proxy.faults = ["503", "drop", "503", None, "drop", "stall", "503", "drop", None, "503", "drop", "503"]
        faulty = _train(tmp_path, "faulty", proxy.url, cache_dir=str(tmp_path / "cache"), cache_bytes=limit)
        applied = [f for _, f in proxy.requests if f]
    assert applied == ["503", "drop", "503", "drop", "stall", "503", "drop", "503", "drop", "503"]
    _same_run(local_run, faulty)


def test_the_sampler_prefetches_the_shards_of_the_batches_ahead(
    train_set: Path, train_http: str, tmp_path: Path
) -> None:
    from ssltrain.config import StoreConfig
    from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog

    store = StoreConfig(cache_dir=str(tmp_path / "cache"), prefetch=2)
    catalog = ShardCatalog.from_spec(train_http, store=store)
    order = catalog.stream_order(streams=4, window=16, seed=0)  # each stream reads one shard at a time
    sampler = GlobalBatchSampler(order, 16).with_prefetch(catalog.prefetch, ahead=1)
    first = next(iter(sampler))  # the first two batches' shards are asked for; nothing is read yet
    deadline = time.monotonic() + 10
    while len(_held(tmp_path / "cache")) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(_held(tmp_path / "cache")) == sorted(_shard_bytes(train_set))
    assert catalog.read(first[0][0]).image is not None
    catalog.close()


def test_a_shard_gone_from_the_store_is_skipped_and_counted(train_set: Path, train_s3: str, tmp_path: Path) -> None:
    from ssltrain.eval.metrics_log import read_metrics

    fs = filesystem("s3://", StoreOptions(endpoint_url=train_s3))
    for f in train_set.iterdir():
        if f.is_file() and f.name != "train-part2.tar":  # the manifest still lists it
            fs.put_file(str(f), f"{BUCKET}/gone/{f.name}")
    start = time.monotonic()
    run = _train(tmp_path, "gone", f"s3://{BUCKET}/gone", cache_dir=str(tmp_path / "cache"), endpoint_url=train_s3)
    assert time.monotonic() - start < 60
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 4 and last["data_skipped"] == 16  # one epoch: every sample of the missing shard
