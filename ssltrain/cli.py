"""``ssltrain`` command line: ``shards``, ``train``, ``eval``, ``report``, ``export``, ``launch``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from ssltrain.checkpoint import SINGLE_PROCESS_DCP_WARNING, CheckpointError
from ssltrain.config import ConfigError, load_config
from ssltrain.data.shards import DataError

log = logging.getLogger("ssltrain")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    warnings.simplefilter("default")
    # "default" overrides the module-level ignore in checkpoint.py: DCP warns on every single-process save.
    warnings.filterwarnings("ignore", message=SINGLE_PROCESS_DCP_WARNING)
    logging.captureWarnings(True)


def _write(samples, out: Path, prefix: str, max_count: int) -> list[Path]:
    from ssltrain.data.shards import write_shards

    start = time.perf_counter()
    paths = write_shards(samples, out, prefix, max_count=max_count)
    log.info("wrote %d shards to %s/%s-*.tar in %.1fs", len(paths), out, prefix, time.perf_counter() - start)
    return paths


def cmd_shards(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.source in ("shapes", "digits"):
        from ssltrain.data.embedded import EMBEDDED

        dataset = EMBEDDED[args.source]
        sizes = dataset.split_sizes or {"train": args.train, "val": args.val}
        for split, count in sizes.items():
            _write(dataset.samples(split, count, seed=args.seed, size=args.size), out, split, args.shard_size)
        (out / "classes.json").write_text(json.dumps(list(dataset.classes)))
        return
    from ssltrain.data import folders

    if args.source == "imagefolder":
        classes, samples = folders.imagefolder_samples(Path(args.root))
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.json").write_text(json.dumps(classes))
    else:
        samples = folders.unlabeled_samples(Path(args.root))
    _write(samples, out, args.prefix, args.shard_size)
    log.info("%d images written, %d unreadable files skipped", samples.yielded, samples.skipped)


def cmd_train(args: argparse.Namespace) -> None:
    from ssltrain.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, stop_after_steps=args.stop_after_steps)
    print(f"run directory: {run_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    from ssltrain.export import export_backbone

    formats = ("safetensors", "torch") if args.format == "both" else (args.format,)
    for path in export_backbone(Path(args.source), Path(args.out) if args.out else Path(args.source) / "export", formats):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssltrain", description="Self-supervised pretraining of vision encoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards (with DALI-compatible .idx files)")
    shards.add_argument("source", choices=["shapes", "digits", "imagefolder", "unlabeled"],
                        help="embedded sets (shapes, digits) or your images (class-folder tree, or any folder)")
    shards.add_argument("root", nargs="?", help="input folder for imagefolder / unlabeled")
    shards.add_argument("--out", required=True, help="output directory for the .tar and .idx files")
    shards.add_argument("--prefix", default="train", help="shard name prefix for folder sources")
    shards.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    shards.add_argument("--train", type=int, default=6000, help="shapes: training images")
    shards.add_argument("--val", type=int, default=1000, help="shapes: held-out images")
    shards.add_argument("--size", type=int, default=32, help="embedded sets: image side in pixels")
    shards.add_argument("--seed", type=int, default=0)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "shards" and args.source in ("imagefolder", "unlabeled") and not args.root:
        print(f"ssltrain shards {args.source}: give the input folder, e.g. ssltrain shards {args.source} ~/images --out data/mine", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"ssltrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
