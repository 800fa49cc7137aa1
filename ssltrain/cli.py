"""``ssltrain`` command line: ``shards``, ``train``, ``eval``, ``report``, ``export``, ``launch``, ``sweep``, ``bench``.

Only the command being run is built and imported (``COMMANDS``): torch takes seconds to import, and ``ssltrain
--help`` or a mistyped command should answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ssltrain.config import ConfigError, load_config
from ssltrain.core.checkpoint_layout import CheckpointError
from ssltrain.core.logs import ALL_RANKS_ENV, setup_logging
from ssltrain.core.process_group import CollectiveTimeout, read_rank

log = logging.getLogger("ssltrain")


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


class _Parser(argparse.ArgumentParser):
    """Takes ``key=value`` overrides anywhere on the line, also after options (``launch local CONFIG --nproc 2
    name=x``): argparse alone fills a list of positionals only up to the first option. Its subcommands' parsers are
    of this class too, and report a leftover argument with their own usage rather than the top level's."""

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        takes_overrides = any(action.dest == "overrides" for action in self._actions)
        if extras and takes_overrides:
            namespace.overrides = [*(namespace.overrides or []), *filter(_is_override, extras)]
            extras = [arg for arg in extras if not _is_override(arg)]
        if extras and self._subparsers is None:  # a command's own parser: nothing else can take these
            hint = " (overrides are key=value, e.g. steps=100)" if takes_overrides else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras


def _write(samples, out: Path, prefix: str, size) -> list[Path]:
    from ssltrain.data.shards import write_shards

    start = time.perf_counter()
    if size.samples:  # one write_shard per shard: the same samples give the same bytes (a rerun's uploads skip them)
        from itertools import islice

        from ssltrain.data.shards import write_shard

        stream, paths = iter(samples), list[Path]()
        while chunk := list(islice(stream, size.samples)):
            paths.append(write_shard(chunk, out / f"{prefix}-{len(paths):06d}.tar").path)
    else:
        paths = write_shards(samples, out, prefix, max_count=1 << 62, max_size=size.bytes)
    log.info("wrote %d shards to %s/%s-*.tar in %.1fs", len(paths), out, prefix, time.perf_counter() - start)
    return paths


def cmd_shards(args: argparse.Namespace) -> int | None:
    from ssltrain.data.ingest.upload import shard_output
    from ssltrain.data.ingest.writer import ShardSize
    from ssltrain.data.store import StoreOptions

    if args.source == "verify":
        return cmd_shards_verify(args)
    size = ShardSize.parse(args.shard_size)
    options = StoreOptions(endpoint_url=args.endpoint_url or "")  # "": the client's own settings (AWS_ENDPOINT_URL)
    key = f"{args.source}\n{args.prefix}\n{','.join(args.inputs)}"
    with shard_output(args.out, options, args.staging, key, args.workers) as out:  # remote: staged, then uploaded
        _write_source(args, out, size)
    return None


def _write_source(args: argparse.Namespace, out: Path, size: Any) -> None:
    if args.source in ("shapes", "digits"):
        from ssltrain.data.embedded import EMBEDDED

        dataset = EMBEDDED[args.source]
        sizes = dataset.split_sizes or {"train": args.train, "val": args.val}
        for split, count in sizes.items():
            _write(dataset.samples(split, count, seed=args.seed, size=args.size), out, split, size)
        (out / "classes.json").write_text(json.dumps(list(dataset.classes)))
        from ssltrain.data.manifest import write_manifest

        write_manifest(out)
        return
    if args.source == "video":
        from ssltrain.data.ingest.video import write_video_shards

        start = time.perf_counter()
        caps = (
            {"shard_samples": size.samples}
            if size.samples
            else {"shard_samples": 1 << 62, "max_shard_bytes": size.bytes}
        )
        video_report = write_video_shards(
            [Path(p) for p in args.inputs],
            out,
            args.prefix,
            fps=args.fps,
            short_side=args.short_side,
            clip_seconds=args.clip_seconds,
            workers=args.workers,
            **caps,
        )
        log.info("%s in %.1fs", video_report.summary(), time.perf_counter() - start)
        return
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
    log.info(
        "wrote %d shards (%d samples) to %s/%s-*.tar in %.1fs; kept %d finished earlier; %d unreadable files skipped",
        len(report.written),
        report.samples,
        out,
        args.prefix,
        time.perf_counter() - start,
        len(report.kept),
        len(report.skipped),
    )


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from ssltrain.data.verify import verify_shards

    report = verify_shards(
        ",".join(args.inputs), workers=args.workers, decode=not args.no_decode, fix_index=args.fix_index
    )
    for problem in report.problems:
        print(problem)
    bad = sum(1 for s in report.shards if s.problems) + len(report.manifest_problems)  # + listed but missing
    print(
        f"{len(report.shards)} shards, {report.samples} samples: "
        + ("all good" if report.ok else f"{len(report.problems)} problems in {bad} shards")
    )
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> None:
    from ssltrain.core.process_group import explain_timeouts, read_env
    from ssltrain.engine.loop import train
    from ssltrain.launch.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    env = read_env()
    for warning in preflight(cfg, env.world_size):
        log.warning(warning)
    with explain_timeouts(cfg.dist.timeout_s):
        run_dir = train(cfg, stop_after_steps=args.stop_after_steps)
    if env.rank == 0:
        print(f"run directory: {run_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    from ssltrain.eval.export import export_backbone

    formats = ("safetensors", "torch") if args.format == "both" else (args.format,)
    for path in export_backbone(
        Path(args.source), Path(args.out) if args.out else Path(args.source) / "export", formats
    ):
        print(path)


def add_shards_parser(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help=COMMANDS["shards"][0])
    shards.add_argument(
        "source",
        choices=["shapes", "digits", "imagefolder", "unlabeled", "video", "verify"],
        help="embedded sets (shapes, digits), your images (class-folder tree, or any folder), "
        "video files, or `verify` to check existing shards",
    )
    shards.add_argument(
        "inputs",
        nargs="*",
        help="imagefolder/unlabeled: the input folder; video: video files or "
        "folders; verify: shard directories, globs or {000..009} patterns",
    )
    shards.add_argument(
        "--out",
        help="output directory for the .tar and .idx files, or a store prefix (s3://bucket/set, gs://...): shards are "
        "staged locally and uploaded one by one, the manifest last; a rerun uploads only what is missing",
    )
    shards.add_argument(
        "--staging",
        help="remote --out: the local directory shards are written to before upload (default: one under the "
        "system temp directory, removed after a complete upload)",
    )
    shards.add_argument(
        "--endpoint-url",
        help="remote --out on an S3-compatible store (MinIO, Ceph, R2): its endpoint; default: the client's own "
        "settings (AWS_ENDPOINT_URL, ~/.aws); credentials always come from the client's usual chain",
    )
    shards.add_argument("--prefix", default="train", help="shard name prefix for folder and video sources")
    shards.add_argument(
        "--shard-size", default="10000", help="samples per shard (10000) or bytes per shard (1GB, 500MB)"
    )
    shards.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes writing (or verifying) shards in parallel"
    )
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


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help=COMMANDS["train"][0])
    train.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.3 data.batch_size=128")
    train.add_argument(
        "--stop-after-steps",
        type=int,
        help="checkpoint and stop after this many steps (time-sliced jobs); the next start resumes",
    )
    train.set_defaults(func=cmd_train)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help=COMMANDS["export"][0])
    export.add_argument("source", help="runs/<name> (its latest checkpoint) or a checkpoints/step-<N> directory")
    export.add_argument("--out", help="output directory (default: SOURCE/export)")
    export.add_argument("--format", choices=["both", "safetensors", "torch"], default="both")
    export.set_defaults(func=cmd_export)


# Every subcommand, in the order `ssltrain --help` lists them: its help line there, and the function (module:name)
# that adds its parser to the subcommands. Mounting imports the module; only the command being run is mounted.
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": (
        "write WebDataset shards (with DALI-compatible .idx files), or verify them",
        "ssltrain.cli:add_shards_parser",
    ),
    "train": ("pretrain: ssltrain train CONFIG [key=value ...]", "ssltrain.cli:add_train_parser"),
    "eval": ("kNN and linear probes of a checkpoint vs. a random-init backbone", "ssltrain.eval.cli:add_eval_parser"),
    "report": (
        "write runs/<name>/report.md with plots from metrics.jsonl and eval.json",
        "ssltrain.eval.cli:add_report_parser",
    ),
    "export": (
        "the backbone as a plain torchvision/timm state dict (safetensors, torch)",
        "ssltrain.cli:add_export_parser",
    ),
    "launch": ("run training on Slurm (submitit, requeue) or under torchrun", "ssltrain.launch.cli:register"),
    "sweep": (
        "many runs as one experiment (grid, random, Optuna; local or a Slurm array) and its report",
        "ssltrain.launch.sweep.cli:add_sweep_parser",
    ),
    "bench": ("profile a config's training step: where the time goes", "ssltrain.engine.benchmark:add_bench_parser"),
}


def _mount(name: str) -> Callable[[argparse._SubParsersAction], Any]:
    module, function = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``command`` only that command's (the others listed by name and help line)."""
    parser = _Parser(
        prog="ssltrain",
        description="Self-supervised pretraining of vision encoders.",
        epilog=f"Under torchrun or Slurm only rank 0 prints its progress; {ALL_RANKS_ENV}=1 makes every rank print.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_line, _) in COMMANDS.items():
        if command is None or name == command:
            _mount(name)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _shards_usage_error(args: argparse.Namespace) -> str:
    example = {"imagefolder": "~/images", "unlabeled": "~/images", "video": "~/videos", "verify": "data/mine"}
    if args.source in example and not args.inputs:
        what = "the input folder" if args.source != "verify" else "the shards to check"
        return f"give {what}, e.g. ssltrain shards {args.source} {example[args.source]}" + (
            "" if args.source == "verify" else " --out data/mine"
        )
    if args.source in ("imagefolder", "unlabeled") and len(args.inputs) > 1:
        return f"takes one input folder, got {len(args.inputs)}"
    if args.source != "verify" and not args.out:
        return "give the output directory with --out DIR"
    return ""


def _out_error(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        return f"--out '{out}' is a file; give a directory (it is created if missing)"
    return ""


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors whose message says what is wrong and how to fix it: printed as one line, exit 2. DataError only
    once the data layer is loaded (it imports torch), as nothing else can raise it."""
    errors: tuple[type[Exception], ...] = (ConfigError, CheckpointError)
    shards = sys.modules.get("ssltrain.data.shards")
    return errors + (shards.DataError,) if shards is not None else errors


def _os_error(err: OSError) -> str:
    path = err.filename
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        fix = "check the path"
    elif isinstance(err, (FileExistsError, IsADirectoryError)):
        fix = "a file and a directory are in each other's way; choose another path"
    else:
        fix = "make it writable, or write elsewhere (out_dir=DIR for training, --out DIR for the others)"
    return f"'{path}': {err.strerror or err}; {fix}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    usage = (_shards_usage_error(args) if args.command == "shards" else "") or _out_error(args)
    if usage:
        name = f"shards {args.source}" if args.command == "shards" else args.command
        print(f"ssltrain {name}: {usage}", file=sys.stderr)
        return 2
    setup_logging(read_rank())
    name = " ".join(filter(None, (args.command, getattr(args, "launcher", None))))
    try:
        return args.func(args) or 0  # a command returns a non-zero status when it found problems (shards verify)
    except CollectiveTimeout as err:
        print(f"ssltrain {name}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a path that is missing, in the way or not writable; ssltrain's own FileNotFoundErrors
        if err.filename is None and not isinstance(err, FileNotFoundError):
            raise
        print(f"ssltrain {name}: error: {_os_error(err) if err.filename else err}", file=sys.stderr)
        return 2
    except _user_errors() as err:
        print(f"ssltrain {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
