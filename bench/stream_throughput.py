"""Training-input throughput on the same shards: ssltrain from local disk, loopback HTTP and loopback S3, beside
webdataset's own pipeline, MosaicML Streaming and litdata.

    python bench/stream_throughput.py                      # 768 JPEGs in 12 shards, 3 rounds (~5 min on 2 cores)
    python bench/stream_throughput.py --quick              # 256 JPEGs, batch 16, 1 round (~1 min)
    python bench/stream_throughput.py --competitor-python /path/to/venv/bin/python   # where streaming/litdata live

Every arm reads one epoch of the same images with 2 DataLoader workers (``--workers``) and does the same work per
sample: PIL decode, then ssltrain's own CPU renderer (:class:`ssltrain.data.augment.CPURenderer`) for two global
views at ``--size`` px (default 224: the issue's recipe, 2 x 224 with jitter, grey, blur, solarize) seeded per
sample, so only the reading and streaming machinery differs between arms. 224 px keeps the default run at about 5
minutes on 2 cores with 768 images (a few shards per worker); ``--size 64`` renders a quarter of the pixels, so the
reading weighs more:

- ``ssltrain-local``: ``build_train_loader`` over the shard directory (the run's own loader: ShardCatalog, the
  stream order with ``data.streams``/``data.shuffle_window``, GlobalBatchSampler, pread from the tars);
- ``ssltrain-http``: the same from nginx on loopback (``tests/servers.py``), whole shards into the ShardCache
  (``data.store.cache_dir``, an empty one each round) with its prefetch;
- ``ssltrain-s3``: the same from moto's S3 server on loopback through s3fs (shards uploaded by ssltrain's
  ``upload_shard_set``, as ``ssltrain shards --out s3://...`` does); moto is a Python server sharing the cores;
- ``webdataset``: ``wds.WebDataset(tars).shuffle(window).decode("pil")`` + the renderer, in a torch DataLoader;
- ``mosaic``: MosaicML Streaming's ``StreamingDataset`` (remote = its MDS directory, local = an empty cache each
  round) over the images converted with its ``MDSWriter``;
- ``litdata``: litdata's ``StreamingDataset`` + ``StreamingDataLoader`` over the images converted with
  ``litdata.optimize`` (chunks of the same sample count as the tars).

Each measurement runs in a fresh process; its rate counts the images from the arrival of batch 2 x workers + 1 to
the epoch's end (imports, worker start-up, the first shards and the batches finished meanwhile are left out; the
first batch's time is printed). Arms run round-robin, A B C ... A B C ..., so background load hits each alike;
the table gives each arm's median img/s over the rounds and its ratio to ssltrain-local in the same run, and
remote / local for HTTP and S3.
It also gives the CPU milliseconds per image that the arm's process and its workers spent in that window (the
client's cost, which load from other jobs barely moves) and, for the remote arms, the CPU seconds the server spent
(nginx's process; moto's threads run in this driver process): on a 2-core machine the server takes them from the
loader.
Conversion times (webdataset needs none; S3 upload, MDS, litdata) are printed and not part of any rate.

MosaicML Streaming pins numpy<2.2 (and transformers<5, google-cloud-storage<3.3), so it is not installed beside
ssltrain's environment: put both competitors into a second venv (bench/requirements-stream.txt says how) and pass
its python as ``--competitor-python``; an arm whose package is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ARMS = ["ssltrain-local", "ssltrain-http", "ssltrain-s3", "webdataset", "mosaic", "litdata"]
COMPETITORS = {"mosaic": "streaming", "litdata": "litdata"}  # arm -> module it needs
SEED = 0
BUCKET = "bench"


# -- the work every arm does per sample ------------------------------------------------------------------------------
def recipe_overrides(size: int) -> list[str]:
    """The augmentation recipe: two global views at ``size`` px, no local crops, the default probabilities."""
    return ["augment.local_crops.count=0", "augment.global_crops.count=2", f"augment.global_crops.size={size}"]


class TwoViews:
    """ssltrain's CPU renderer on a decoded image, seeded by the sample's key: what the competitors' workers run
    after their own reading and decoding (ssltrain's loader runs the same renderer, seeded by position)."""

    def __init__(self, size: int) -> None:
        from ssltrain.config import load_config
        from ssltrain.data.augment import CPURenderer

        self.renderer = CPURenderer(load_config(None, ["data.train=unused", *recipe_overrides(size)]).augment)

    def __call__(self, image: Any, key: str) -> tuple[Any, Any]:
        from ssltrain.data.augment import SampleRandom

        views, _ = self.renderer(image, SampleRandom.of(SEED, zlib.crc32(key.encode())))
        return views[0], views[1]

    def from_jpeg(self, data: bytes, key: str) -> tuple[Any, Any]:
        from ssltrain.data.loaders.cpu import decode_image

        return self(decode_image(data), key)


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # as ssltrain's loader workers: one sample at a time per core


# -- one measurement (in its own process) ----------------------------------------------------------------------------
def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (those gone are left out)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def children(name: str | None = None) -> list[int]:
    """This process's live child processes (named ``name`` if given): the loader workers, nginx."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    if name is None:
        return pids
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    out.append(pid)
        except OSError:
            continue
    return out


def timed(
    batches: Iterable[Any], job: dict[str, Any], size_of: Callable[[Any], int], start: float | None = None
) -> dict[str, float]:
    """Images/s in the steady state: the clock starts when batch ``2 * workers + 1`` arrives (by then the batches
    the workers finished while the loader started, up to ``prefetch_factor`` = 2 each, are consumed), and stops at the
    epoch's end (``job["samples"]``); the first batch's time (from ``start``, default now) is reported apart, as are
    the CPU seconds this process and its workers spent in the window (the client's cost, which other jobs on the
    machine barely change)."""
    start = time.perf_counter() if start is None else start
    warmup = 2 * job["workers"] + 1
    it: Iterator[Any] = iter(batches)
    n = size_of(next(it))
    first_batch_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        n += size_of(next(it))
    t0 = time.perf_counter()
    pids = [os.getpid(), *children()]
    cpu0 = cpu_seconds(pids)
    counted = n
    for batch in it:
        n += size_of(batch)
        if n >= job["samples"]:
            break
    end = time.perf_counter()
    cpu = cpu_seconds(pids) - cpu0
    return {"images": n - counted, "seconds": end - t0, "first_batch_s": first_batch_s, "total": n, "cpu": cpu}


def run_ssltrain(job: dict[str, Any]) -> dict[str, float]:
    import torch

    from ssltrain.config import load_config
    from ssltrain.data.loaders import build_train_loader
    from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog

    overrides = [
        f"data.train={job['spec']}",
        f"data.batch_size={job['batch']}",
        f"data.workers={job['workers']}",
        f"data.streams={job['streams']}",
        f"data.shuffle_window={job['window']}",
        f"seed={SEED}",
        *recipe_overrides(job["size"]),
    ]
    if job.get("cache_dir"):
        overrides.append(f"data.store.cache_dir={job['cache_dir']}")
    if job.get("endpoint_url"):
        overrides.append(f"data.store.endpoint_url={job['endpoint_url']}")
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    catalog = ShardCatalog.from_spec(cfg.data.train, store=cfg.data.store)
    d = cfg.data
    order = catalog.stream_order(d.streams, d.shuffle_window, cfg.seed, d.shuffle)
    sampler = GlobalBatchSampler(order, d.batch_size, cfg.seed)
    loader = build_train_loader(cfg, catalog, sampler, torch.device("cpu"))
    skipped: list[str] = []

    def size_of(views: Any) -> int:
        skipped.extend(views.skipped)
        return int(views.batch_size)

    out = timed(loader, {**job, "samples": sampler.samples_per_epoch}, size_of, start)  # start-up: in first batch
    if skipped:
        raise RuntimeError(f"{len(skipped)} samples skipped, e.g. {skipped[0]}")
    return out


def run_webdataset(job: dict[str, Any]) -> dict[str, float]:
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import functional as TF

    start = time.perf_counter()
    views = TwoViews(job["size"])

    def render(sample: dict[str, Any]) -> tuple[Any, Any, int]:
        a, b = views(TF.pil_to_tensor(sample["jpg"]), sample["__key__"])
        return a, b, int(sample["cls"])

    tars = sorted(str(p) for p in Path(job["dir"]).glob("*.tar"))
    dataset = (
        wds.WebDataset(tars, shardshuffle=len(tars), seed=SEED, empty_check=False)
        .shuffle(job["window"])
        .decode("pil")
        .map(render)
    )
    loader = DataLoader(
        dataset, batch_size=job["batch"], num_workers=job["workers"], worker_init_fn=_worker_init, prefetch_factor=2
    )
    return timed(loader, job, lambda batch: len(batch[0]), start)


def run_mosaic(job: dict[str, Any]) -> dict[str, float]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    start = time.perf_counter()
    views = TwoViews(job["size"])

    class Views(StreamingDataset):
        def __getitem__(self, idx: int) -> tuple[Any, Any, int]:
            sample = super().__getitem__(idx)
            a, b = views.from_jpeg(sample["jpg"], sample["key"])
            return a, b, int(sample["cls"])

    dataset = Views(
        remote=job["dir"],
        local=job["cache_dir"],
        shuffle=True,
        shuffle_seed=SEED,
        shuffle_block_size=job["window"],
        batch_size=job["batch"],
    )
    loader: DataLoader = DataLoader(
        dataset, batch_size=job["batch"], num_workers=job["workers"], worker_init_fn=_worker_init, prefetch_factor=2
    )
    return timed(loader, job, lambda batch: len(batch[0]), start)


def run_litdata(job: dict[str, Any]) -> dict[str, float]:
    from litdata import StreamingDataLoader, StreamingDataset

    start = time.perf_counter()
    views = TwoViews(job["size"])

    def render(sample: dict[str, Any]) -> tuple[Any, Any, int]:
        a, b = views.from_jpeg(sample["jpg"], sample["key"])
        return a, b, int(sample["cls"])

    dataset = StreamingDataset(job["dir"], shuffle=True, seed=SEED, transform=render)
    loader = StreamingDataLoader(
        dataset, batch_size=job["batch"], num_workers=job["workers"], worker_init_fn=_worker_init, prefetch_factor=2
    )
    return timed(loader, job, lambda batch: len(batch[0]), start)


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "ssltrain-local": run_ssltrain,
    "ssltrain-http": run_ssltrain,
    "ssltrain-s3": run_ssltrain,
    "webdataset": run_webdataset,
    "mosaic": run_mosaic,
    "litdata": run_litdata,
}


# -- conversions to the competitors' formats (in the process that has their package) ---------------------------------
def tar_samples(directory: str) -> Iterator[dict[str, Any]]:
    """Every sample of ssltrain's shards, in order: key, JPEG bytes, label."""
    from ssltrain.data.shards import expand_shards, iter_members, read_index

    for tar in expand_shards(directory):
        for entry, members in iter_members(read_index(tar)):
            yield {"key": entry.key, "jpg": members["jpg"], "cls": int(members["cls"].decode())}


def _litdata_items(tar: str) -> Iterator[dict[str, Any]]:
    """litdata's ``optimize`` calls this once per input (a tar) in its workers and stores every item it yields."""
    yield from tar_samples(tar)


def convert(kind: str, job: dict[str, Any]) -> None:
    if kind == "mosaic":
        from streaming import MDSWriter

        columns = {"key": "str", "jpg": "bytes", "cls": "int"}
        with MDSWriter(out=job["out"], columns=columns, size_limit=job["shard_bytes"]) as writer:
            for sample in tar_samples(job["dir"]):
                writer.write(sample)
    else:
        from litdata import optimize

        tars = sorted(str(p) for p in Path(job["dir"]).glob("*.tar"))
        optimize(
            fn=_litdata_items,
            inputs=tars,
            output_dir=job["out"],
            chunk_size=job["shard_samples"],
            num_workers=job["workers"],
            verbose=False,
        )


# -- the driver ------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def call(python: str, args: list[str], job: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run this script in a fresh ``python`` process; its last stdout line is the JSON result."""
    out = subprocess.run(
        [python, __file__, *args, "--job", json.dumps(job)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{' '.join(args)} failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def has_module(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=_env())
    return probe.returncode == 0


def versions(python: str, modules: list[str]) -> str:
    code = (
        "import importlib.metadata as m, sys\n"
        "for d in sys.argv[1:]:\n"
        "    try: print(d, m.version(d))\n"
        "    except Exception: pass\n"
    )
    out = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, env=_env())
    found = [line for line in out.stdout.split("\n") if line]
    return ", ".join(found) if found else "none of " + ", ".join(modules)


def _jpeg_file(args: tuple[int, Path, int]) -> int:
    from ssltrain.data.embedded import synthetic_jpeg

    index, root, classes = args
    sample = synthetic_jpeg(index, classes=classes)
    folder = root / f"class{sample['cls']:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
    return len(sample["jpg"])


def write_data(root: Path, images: int, shard_samples: int, procs: int) -> Path:
    """Synthetic ImageNet-like JPEGs in a class-folder tree, then ssltrain's shard writer (as ``ssltrain shards
    imagefolder``): tars, .idx files and manifest.json."""
    from ssltrain.data.ingest.folders import imagefolder_samples
    from ssltrain.data.ingest.images import ingest_folder
    from ssltrain.data.ingest.writer import ShardSize

    start = time.perf_counter()
    tree, shards = root / "images", root / "shards"
    with Pool(procs) as pool:
        sizes = pool.map(_jpeg_file, [(i, tree, 10) for i in range(images)], chunksize=8)
    _, samples = imagefolder_samples(tree)
    report = ingest_folder(samples, shards, "train", ShardSize(samples=shard_samples), workers=procs)
    print(
        f"wrote {images} JPEGs (~500x375, {sum(sizes) / images / 1024:.0f} kB average) into {len(report.shards)} "
        f"shards of {shard_samples} with ssltrain's shard writer in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images in shards of 32, one round (~1 min)")
    parser.add_argument("--images", type=int, help="JPEGs in the set (one epoch per measurement; default 768)")
    parser.add_argument("--shard-samples", type=int, help="samples per shard (default 64)")
    parser.add_argument("--rounds", type=int, help="rounds of every arm (default 3)")
    parser.add_argument("--size", type=int, default=224, help="side of the two global views")
    parser.add_argument("--batch", type=int, help="batch size (default 32; 16 with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes of every arm")
    parser.add_argument("--streams", type=int, default=2, help="ssltrain's data.streams")
    parser.add_argument("--window-shards", type=int, default=2, help="shuffle window in shards (every arm)")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument(
        "--competitor-python",
        default=os.environ.get("SSLTRAIN_BENCH_PYTHON", sys.executable),
        help="python that imports mosaicml-streaming and litdata (and ssltrain); default: this one",
    )
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--convert", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(RUNNERS[args.arm](json.loads(args.job))))
        return
    if args.convert:
        convert(args.convert, json.loads(args.job))
        return
    images = args.images or (256 if args.quick else 768)
    shard_samples = args.shard_samples or (32 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    args.batch = args.batch or (16 if args.quick else 32)
    images -= images % args.batch  # whole batches: every arm reads the same number of images
    if images < (2 * args.workers + 5) * args.batch:
        parser.error(f"--images {images}: too few for {2 * args.workers + 1} warm-up batches and 4 timed ones")
    with tempfile.TemporaryDirectory(prefix="ssltrain-bench-stream-") as tmp:
        drive(Path(tmp), args, images, shard_samples, rounds)


def drive(root: Path, args: argparse.Namespace, images: int, shard_samples: int, rounds: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from servers import moto_s3, nginx  # the test fixtures (tests/ is not a package)

    from ssltrain.data.ingest.upload import upload_shard_set
    from ssltrain.data.store import StoreOptions, filesystem

    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {images} images, {args.workers} workers, batch "
        f"{args.batch}, 2 x {args.size} px views, shuffle window {args.window_shards} shards, {rounds} round(s); "
        f"{started}",
        flush=True,
    )
    shards = write_data(root, images, shard_samples, args.workers)
    tars = sorted(shards.glob("*.tar"))
    shard_bytes = sum(p.stat().st_size for p in tars) // len(tars)
    window = args.window_shards * shard_samples
    base = {"batch": args.batch, "workers": args.workers, "size": args.size, "window": window, "samples": images}
    ssl = {**base, "streams": args.streams}
    mine, other = sys.executable, args.competitor_python
    jobs: dict[str, tuple[str, dict[str, Any]]] = {
        "ssltrain-local": (mine, {**ssl, "spec": str(shards)}),
        "webdataset": (mine, {**base, "dir": str(shards)}),
    }
    skipped: dict[str, str] = {}
    convert_s: dict[str, float] = {}
    for arm, module in COMPETITORS.items():
        if arm not in args.arms:
            continue
        if not has_module(other, module):
            pkg = {"mosaic": "mosaicml-streaming", "litdata": "litdata"}[arm]
            skipped[arm] = f"{module} does not import in {other} (pip install -r bench/requirements-stream.txt)"
            print(f"skipping {arm}: {skipped[arm]} [{pkg}]", flush=True)
            continue
        out = str(root / arm)
        job = {"dir": str(shards), "out": out, "shard_bytes": shard_bytes, "shard_samples": shard_samples}
        start = time.perf_counter()
        try:
            call(other, ["--convert", arm], {**job, "workers": args.workers})
        except RuntimeError as err:
            skipped[arm] = f"conversion failed: {err}"
            print(f"skipping {arm}: {skipped[arm]}", flush=True)
            continue
        convert_s[arm] = time.perf_counter() - start
        jobs[arm] = (other, {**base, "dir": out})
    with nginx(shards, root / "nginx") as http, moto_s3() as endpoint:
        options = StoreOptions(endpoint_url=endpoint)
        filesystem("s3://", options).mkdir(BUCKET)
        start = time.perf_counter()
        upload_shard_set(shards, f"s3://{BUCKET}/train", options, workers=args.workers)
        convert_s["ssltrain-s3 (upload)"] = time.perf_counter() - start
        jobs["ssltrain-http"] = (mine, {**ssl, "spec": http})
        jobs["ssltrain-s3"] = (mine, {**ssl, "spec": f"s3://{BUCKET}/train", "endpoint_url": endpoint})
        print("conversion (not timed in any rate): " + ", ".join(f"{k} {v:.1f}s" for k, v in convert_s.items()))
        arms = [a for a in args.arms if a in jobs]
        rates: dict[str, list[float]] = {a: [] for a in arms}
        first: dict[str, list[float]] = {a: [] for a in arms}
        cpu_ms: dict[str, list[float]] = {a: [] for a in arms}
        server_s: dict[str, list[float]] = {a: [] for a in ("ssltrain-http", "ssltrain-s3")}
        for r in range(rounds):
            for arm in arms:
                python, job = jobs[arm]
                cache = root / f"cache-{arm}-{r}"
                if arm in ("ssltrain-http", "ssltrain-s3", "mosaic"):  # an empty cache: every shard is fetched
                    job = {**job, "cache_dir": str(cache)}
                nginx_pids = children("nginx")
                server_before = time.process_time() + cpu_seconds(nginx_pids)  # moto's threads run in this process
                try:
                    res = call(python, ["--arm", arm], job)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    print(f"round {r + 1} {arm}: failed: {err}", flush=True)
                    continue
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                server = time.process_time() + cpu_seconds(nginx_pids) - server_before
                rate = res["images"] / res["seconds"]
                rates[arm].append(rate)
                first[arm].append(res["first_batch_s"])
                cpu_ms[arm].append(1000 * res["cpu"] / res["images"])
                if arm.startswith("ssltrain-") and arm != "ssltrain-local":
                    server_s[arm].append(server)
                print(
                    f"round {r + 1} {arm:<15} {rate:7.1f} img/s ({int(res['total'])} images, first batch "
                    f"{res['first_batch_s']:.1f}s, {cpu_ms[arm][-1]:.1f} CPU ms/img in the client"
                    + (f", server {server:.1f} CPU s" if arm in server_s else "")
                    + f", load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    report(rates, first, cpu_ms, server_s, skipped, mine, other)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


def report(
    rates: dict[str, list[float]],
    first: dict[str, list[float]],
    cpu_ms: dict[str, list[float]],
    server_s: dict[str, list[float]],
    skipped: dict[str, str],
    mine: str,
    other: str,
) -> None:
    med = {a: statistics.median(v) for a, v in rates.items() if v}
    local = med.get("ssltrain-local")
    print("\n| arm | img/s (median) | rounds | / ssltrain-local | client CPU ms/img | server CPU s | first batch s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for arm in ARMS:
        if arm in skipped:
            print(f"| {arm} | skipped: {skipped[arm]} | | | | | |")
        elif arm in med:
            ratio = f"{med[arm] / local:.2f}x" if local else "-"
            runs = " / ".join(f"{v:.1f}" for v in rates[arm])
            server = f"{statistics.median(server_s[arm]):.1f}" if server_s.get(arm) else "-"
            print(
                f"| {arm} | {med[arm]:.1f} | {runs} | {ratio} | {statistics.median(cpu_ms[arm]):.1f} | {server} "
                f"| {statistics.median(first[arm]):.1f} |"
            )
    if local:
        for arm in ("ssltrain-http", "ssltrain-s3"):
            if arm in med:
                print(f"{arm} / ssltrain-local: {med[arm] / local:.3f} (target >= 0.90)")
        competitors = {a: v for a, v in med.items() if not a.startswith("ssltrain")}
        if competitors:
            best = max(competitors, key=lambda a: competitors[a])
            print(f"ssltrain-local / best competitor ({best}): {local / competitors[best]:.3f} (target >= 1.00)")
    print("versions: " + versions(mine, ["torch", "numpy", "pillow", "webdataset", "s3fs", "moto", "fsspec"]))
    if other != mine:
        print(f"competitors ({other}): " + versions(other, ["mosaicml-streaming", "litdata", "numpy", "torch"]))
    else:
        print("competitors: " + versions(mine, ["mosaicml-streaming", "litdata"]))


if __name__ == "__main__":
    main()
