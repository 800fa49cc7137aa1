"""Start-up time and resident memory of the data path: the O(shards) catalog and stream order vs a full index parse.

    python bench/stream.py                              # 1e9 samples in 100,000 shards vs the full parse at 1.28M
    python bench/stream.py --shards 10000 --old 128     # a quick look

Each case runs in a fresh process (so its resident memory is its own) on synthetic shards written to a temporary
directory: sparse tars of the right size (no data is read at start-up) with, for the cases that read them, DALI
v1.2 ``.idx`` files of 10,000 samples each (png + cls, ImageNet-like offsets and names), and a ``manifest.json``.
Measured: the time from nothing to the first global batch's sample ids on rank 0 of 8 (catalog, stream order,
sampler), and the resident memory it leaves (VmRSS after minus before, per rank; x8 for an 8-rank node).

- ``manifest``: ``ShardCatalog.from_spec`` on a directory with a manifest (what ``ssltrain shards`` writes);
- ``idx-count``: the same without a manifest (each ``.idx`` is counted by its lines);
- ``full-parse``: the catalog as it was before it kept per-shard state (``load_indices`` of every index, then per-
  sample arrays and one key string per sample), reproduced here from that code, and its global argsort order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PER_SHARD = 10_000
SAMPLE_BYTES = 110_000  # an ImageNet JPEG and its tar headers
BATCH, RANKS = 4096, 8


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_set(root: Path, shards: int, with_index: bool, with_manifest: bool) -> None:
    """``shards`` sparse tars of PER_SHARD samples; their indexes and manifest as asked."""
    root.mkdir(parents=True, exist_ok=True)
    size = PER_SHARD * SAMPLE_BYTES + 1024
    entries = []
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with open(root / name, "wb") as f:
            f.truncate(size)
        if with_index:
            lines = [f"v1.2 {PER_SHARD}"]
            for j in range(PER_SHARD):
                off = 512 + j * SAMPLE_BYTES
                key = f"n{s % 1000:08d}_{s * PER_SHARD + j:09d}"
                lines.append(f"jpg {off} {SAMPLE_BYTES - 2048} {key}.jpg cls {off + SAMPLE_BYTES - 1024} 3 {key}.cls")
            (root / f"train-{s:06d}.idx").write_text("\n".join(lines) + "\n")
        sha = hashlib.sha256(name.encode()).hexdigest()  # not the bytes' digest: nothing here checks it
        entries.append({"path": name, "samples": PER_SHARD, "bytes": size, "sha256": sha})
    if with_manifest:
        doc = {"format": 1, "total_samples": shards * PER_SHARD, "shards": entries}
        (root / "manifest.json").write_text(json.dumps(doc))


def legacy_catalog(spec: str) -> tuple[list[str], list[np.ndarray]]:
    """The catalog's start-up before it kept per-shard state (ssltrain at commit de88594): every index parsed into
    per-sample objects, then per-sample arrays and one key string per sample kept (the parsed indexes are freed)."""
    from ssltrain.data.shards import IMAGE_EXTS, VIDEO_EXTS, expand_shards, load_indices

    indices = load_indices(expand_shards(spec))
    keys: list[str] = []
    shard, img_off, img_size, cls_off, cls_size = [], [], [], [], []
    for sid, idx in enumerate(indices):
        for entry in idx.samples:
            keys.append(entry.key)
            shard.append(sid)
            ext = next((e for e in (*IMAGE_EXTS, *VIDEO_EXTS) if e in entry.components), None)
            image = entry.components[ext] if ext else None
            img_off.append(image.offset if image else -1)
            img_size.append(image.size if image else -1)
            cls = entry.components.get("cls")
            cls_off.append(cls.offset if cls else -1)
            cls_size.append(cls.size if cls else -1)
    return keys, [np.asarray(a, dtype=np.int64) for a in (shard, img_off, img_size, cls_off, cls_size)]


def run_case(case: str, directory: str) -> dict[str, float]:
    """One case in this (fresh) process: seconds to rank 0's first batch ids, and the resident bytes it added."""
    import ssltrain.data.shards
    import ssltrain.data.stream  # noqa: F401 (the modules' own memory is not the data path's)

    base = rss_bytes()
    start = time.perf_counter()
    if case == "full-parse":
        from ssltrain.data.order import hash_order

        keys, arrays = legacy_catalog(directory)
        n = len(keys)
        permutation = hash_order(n, 0)  # the old epoch order: a global argsort, in every rank
        first = len(permutation[np.arange(0, BATCH, RANKS)])
    else:
        from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog

        catalog = ShardCatalog.from_spec(directory)
        order = catalog.stream_order(streams=64, window=4 * PER_SHARD, seed=0)
        first = len(next(iter(GlobalBatchSampler(order, BATCH, rank=0, world_size=RANKS))))
        n = len(catalog)
    elapsed = time.perf_counter() - start
    assert first == BATCH // RANKS
    return {"samples": n, "seconds": elapsed, "rss": rss_bytes() - base}


def measure(case: str, directory: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--dir", str(directory)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100_000, help="shards of the large set (10,000 samples each)")
    ap.add_argument("--old", type=int, default=128, help="shards of the full-parse comparison (128: 1.28M samples)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.dir)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        big, small, bare = Path(tmp, "big"), Path(tmp, "small"), Path(tmp, "bare")
        t = time.perf_counter()
        write_set(big, args.shards, with_index=False, with_manifest=True)
        write_set(small, args.old, with_index=True, with_manifest=True)
        write_set(bare, args.old, with_index=True, with_manifest=False)
        print(f"wrote the synthetic sets in {time.perf_counter() - t:.0f}s", flush=True)
        rows = [
            ("manifest", big, "manifest"),
            ("manifest", small, "manifest"),
            ("idx-count", bare, "idx-count"),
            ("full-parse", bare, "full-parse"),
        ]
        results = []
        print(f"{'case':<11} {'samples':>14} {'shards':>8} {'start-up s':>11} {'MB/rank':>9} {'GB/8-rank node':>15}")
        for label, directory, case in rows:
            r = measure(case, directory)
            results.append((label, r))
            shards = int(r["samples"]) // PER_SHARD
            print(
                f"{label:<11} {int(r['samples']):>14,} {shards:>8,} {r['seconds']:>11.2f} {r['rss'] / 1e6:>9.1f} "
                f"{RANKS * r['rss'] / 1e9:>15.2f}",
                flush=True,
            )
        big_r, small_r, _, old_r = (r for _, r in results)

        def ratio(key: str, new: dict[str, float]) -> float:
            return old_r[key] / max(new[key], 1e-9)

        print(
            f"full parse of {int(old_r['samples']):,} samples vs the manifest catalog of {int(big_r['samples']):,} "
            f"({big_r['samples'] / old_r['samples']:.0f}x the data): start-up {ratio('seconds', big_r):.1f}x "
            f"faster, memory {ratio('rss', big_r):.1f}x smaller; at the same {int(small_r['samples']):,} samples: "
            f"{ratio('seconds', small_r):.0f}x faster, {ratio('rss', small_r):.0f}x smaller"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
