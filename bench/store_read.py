"""Loopback read throughput of one shard: local file, nginx over HTTP, moto's S3 server, and a download into the
shard cache (sha256 checked, fsynced, renamed).

    python bench/store_read.py              # a 100 MB shard of random bytes
    python bench/store_read.py --mb 20      # a quick look

Needs nginx (tests/servers_setup.sh) and the dev extra (s3fs, moto[server]); the servers are the test fixtures of
tests/servers.py. Each figure is the best of three reads. moto is a Python server: its figure bounds what its
server process delivers, not the client.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import moto_s3, nginx  # noqa: E402 (the test fixtures: tests/ is not a package)

from ssltrain.data.shard_cache import ShardCache, ShardRef  # noqa: E402
from ssltrain.data.store import StoreOptions, filesystem, iter_chunks  # noqa: E402


def rate(name: str, read: Callable[[], Iterable[bytes]], size: int, reps: int = 3) -> None:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        got = sum(len(c) for c in read())
        best = min(best, time.perf_counter() - start)
        assert got == size, (name, got, size)
    print(f"{name:34s} {size / best / 1e6:8.0f} MB/s  ({best:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="shard size in MB (2^20 bytes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.mb)


def run(root: Path, mb: int) -> None:
    shard = root / "shard.tar"
    shard.write_bytes(os.urandom(mb << 20))
    size, sha = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    print(f"one {mb} MB shard, chunks of 8 MB unless said")
    rate("local file", lambda: iter_chunks(str(shard), StoreOptions()), size)
    with nginx(root, root / "nginx") as http:
        for chunk_mb in (8, 32):
            opts = StoreOptions(chunk_bytes=chunk_mb << 20)
            rate(
                f"http (nginx), {chunk_mb} MB chunks", lambda o=opts: iter_chunks(f"{http}/shard.tar", o, 0, size), size
            )

        def cached() -> Iterable[bytes]:
            with (
                tempfile.TemporaryDirectory() as cache_dir,
                ShardCache(cache_dir, 1 << 40, StoreOptions()) as cache,
                cache.open(ShardRef(f"{http}/shard.tar", size, sha)) as f,
            ):
                yield f.read()

        rate("http (nginx) into the cache", cached, size)
    with moto_s3() as endpoint:
        fs = filesystem("s3://", StoreOptions(endpoint_url=endpoint))
        fs.mkdir("bench")
        fs.put_file(str(shard), "bench/shard.tar")
        for chunk_mb in (8, 32):
            opts = StoreOptions(endpoint_url=endpoint, chunk_bytes=chunk_mb << 20)
            rate(
                f"s3 (moto), {chunk_mb} MB chunks", lambda o=opts: iter_chunks("s3://bench/shard.tar", o, 0, size), size
            )


if __name__ == "__main__":
    main()
