"""``ssltrain`` command line: ``shards``, ``train``, ``eval``, ``report``, ``export``, ``launch``, ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from ssltrain.core.checkpoint_layout import SINGLE_PROCESS_DCP_WARNING, CheckpointError
from ssltrain.config import ConfigError, load_config
from ssltrain.data.shards import DataError

log = logging.getLogger("ssltrain")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    warnings.simplefilter("default")
    # "default" overrides the module-level ignore in checkpoint.py: DCP warns on every single-process save.
    warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP_WARNING)
    logging.captureWarnings(True)


def _write(samples, out: Path, prefix: str, size) -> list[Path]:
    from ssltrain.data.shards import write_shards

    start = time.perf_counter()
    caps = {"max_count": size.samples} if size.samples else {"max_count": 1 << 62, "max_size": size.bytes}
    paths = write_shards(samples, out, prefix, **caps)
    log.info("wrote %d shards to %s/%s-*.tar in %.1fs", len(paths), out, prefix, time.perf_counter() - start)
    return paths


def cmd_shards(args: argparse.Namespace) -> int | None:
    from ssltrain.data.ingest.images import ShardSize

    if args.source == "verify":
        return cmd_shards_verify(args)
    out, size = Path(args.out), ShardSize.parse(args.shard_size)
    if args.source in ("shapes", "digits"):
        from ssltrain.data.embedded import EMBEDDED

        dataset = EMBEDDED[args.source]
        sizes = dataset.split_sizes or {"train": args.train, "val": args.val}
        for split, count in sizes.items():
            _write(dataset.samples(split, count, seed=args.seed, size=args.size), out, split, size)
        (out / "classes.json").write_text(json.dumps(list(dataset.classes)))
        return
    if args.source == "video":
        from ssltrain.data.loaders.video import write_video_shards

        start = time.perf_counter()
        caps = {"shard_samples": size.samples} if size.samples else {"shard_samples": 1 << 62,
                                                                         "max_shard_bytes": size.bytes}
        report = write_video_shards([Path(p) for p in args.inputs], out, args.prefix, fps=args.fps,
                                    short_side=args.short_side, clip_seconds=args.clip_seconds,
                                    workers=args.workers, **caps)
        log.info("%s in %.1fs", report.summary(), time.perf_counter() - start)
        return None
    from ssltrain.data.ingest import folders
    from ssltrain.data.ingest.images import ingest_folder

    root = Path(args.inputs[0])
    if args.source == "imagefolder":
        classes, samples = folders.imagefolder_samples(root)
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.json").write_text(json.dumps(classes))
    else:
        samples = folders.unlabeled_samples(root)
    start = time.perf_counter()
    report = ingest_folder(samples, out, args.prefix, size, workers=args.workers)
    log.info("wrote %d shards (%d samples) to %s/%s-*.tar in %.1fs; kept %d finished earlier; %d unreadable files "
             "skipped", len(report.written), report.samples, out, args.prefix, time.perf_counter() - start,
             len(report.kept), len(report.skipped))


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from ssltrain.data.verify import verify_shards

    report = verify_shards(",".join(args.inputs), workers=args.workers, decode=not args.no_decode,
                           fix_index=args.fix_index)
    for problem in report.problems:
        print(problem)
    bad = sum(1 for s in report.shards if s.problems)
    print(f"{len(report.shards)} shards, {report.samples} samples: " +
          ("all good" if report.ok else f"{len(report.problems)} problems in {bad} shards"))
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> None:
    from ssltrain.engine.loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, stop_after_steps=args.stop_after_steps)
    print(f"run directory: {run_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    from ssltrain.eval.export import export_backbone

    formats = ("safetensors", "torch") if args.format == "both" else (args.format,)
    for path in export_backbone(Path(args.source), Path(args.out) if args.out else Path(args.source) / "export", formats):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssltrain", description="Self-supervised pretraining of vision encoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards (with DALI-compatible .idx files), or verify them")
    shards.add_argument("source", choices=["shapes", "digits", "imagefolder", "unlabeled", "video", "verify"],
                        help="embedded sets (shapes, digits), your images (class-folder tree, or any folder), "
                             "video files, or `verify` to check existing shards")
    shards.add_argument("inputs", nargs="*", help="imagefolder/unlabeled: the input folder; video: video files or "
                        "folders; verify: shard directories, globs or {000..009} patterns")
    shards.add_argument("--out", help="output directory for the .tar and .idx files")
    shards.add_argument("--prefix", default="train", help="shard name prefix for folder and video sources")
    shards.add_argument("--shard-size", default="10000",
                        help="samples per shard (10000) or bytes per shard (1GB, 500MB)")
    shards.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing (or verifying) shards in parallel")
    shards.add_argument("--train", type=int, default=6000, help="shapes: training images")
    shards.add_argument("--val", type=int, default=1000, help="shapes: held-out images")
    shards.add_argument("--size", type=int, default=32, help="embedded sets: image side in pixels")
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--fps", type=float, default=8.0, help="video: frames per second kept")
    shards.add_argument("--short-side", type=int, default=128, help="video: frames resized to this short side")
    shards.add_argument("--clip-seconds", type=float, default=4.0, help="video: length of each clip sample")
    shards.add_argument("--no-decode", action="store_true", help="verify: check structure and index only")
    shards.add_argument("--fix-index", action="store_true", help="verify: rewrite missing or stale .idx files")
    shards.set_defaults(func=cmd_shards)

    train = sub.add_parser("train", help="pretrain: ssltrain train CONFIG [key=value ...]")
    train.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.3 data.batch_size=128")
    train.add_argument("--stop-after-steps", type=int, help="checkpoint and stop after this many steps (time-sliced "
                       "jobs); the next start resumes")
    train.set_defaults(func=cmd_train)

    from ssltrain.eval.cli import add_eval_parser, add_report_parser

    add_eval_parser(sub)
    add_report_parser(sub)

    export = sub.add_parser("export", help="the backbone as a plain torchvision/timm state dict (safetensors, torch)")
    export.add_argument("source", help="runs/<name> (its latest checkpoint) or a checkpoints/step-<N> directory")
    export.add_argument("--out", help="output directory (default: SOURCE/export)")
    export.add_argument("--format", choices=["both", "safetensors", "torch"], default="both")
    export.set_defaults(func=cmd_export)

    from ssltrain.launch.cli import register as register_launch

    register_launch(sub)

    from ssltrain.engine.profile import add_bench_parser

    add_bench_parser(sub)
    return parser


def _shards_usage_error(args: argparse.Namespace) -> str:
    example = {"imagefolder": "~/images", "unlabeled": "~/images", "video": "~/videos", "verify": "data/mine"}
    if args.source in example and not args.inputs:
        what = "the input folder" if args.source != "verify" else "the shards to check"
        return f"give {what}, e.g. ssltrain shards {args.source} {example[args.source]}" + (
            "" if args.source == "verify" else " --out data/mine")
    if args.source in ("imagefolder", "unlabeled") and len(args.inputs) > 1:
        return f"takes one input folder, got {len(args.inputs)}"
    if args.source != "verify" and not args.out:
        return "give the output directory with --out DIR"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "shards":
        usage = _shards_usage_error(args)
        if usage:
            print(f"ssltrain shards {args.source}: {usage}", file=sys.stderr)
            return 2
    _setup_logging()
    try:
        return args.func(args) or 0  # a command returns a non-zero status when it found problems (shards verify)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"ssltrain {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
