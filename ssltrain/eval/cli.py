"""The ``eval`` and ``report`` subcommands, for ``ssltrain/cli.py`` to mount:

    from ssltrain.eval.cli import add_eval_parser, add_report_parser
    add_eval_parser(sub)
    add_report_parser(sub)

``ssltrain eval TARGET`` takes a run directory (its latest checkpoint, or ``--checkpoint``) or a checkpoint
directory. Probe data: ``--data DIR`` is short for ``--train-data 'DIR/train-*.tar' --val-data 'DIR/val-*.tar'``
(the layout ``ssltrain shards`` writes); ``--train-data`` / ``--val-data`` take any shard spec (directory, glob,
brace range, comma-separated list) and override ``--data``; with none of them the run config's eval.train /
eval.val are used.

Under torchrun (``WORLD_SIZE`` > 1) feature extraction is split over the ranks; rank 0 probes and prints.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ssltrain.eval.evaluate import EvalOptions

log = logging.getLogger("ssltrain")

__all__ = [
    "add_eval_arguments",
    "add_eval_parser",
    "add_report_arguments",
    "add_report_parser",
    "cmd_eval",
    "cmd_report",
    "options_from_args",
]


def _list(kind: type, what: str) -> Callable[[str], list]:
    """argparse type for comma-separated numbers (``--knn-k 10,20,100``)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what}: expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None
        if not values or any(v <= 0 for v in values if kind is int):
            raise argparse.ArgumentTypeError(
                f"{what}: expected positive comma-separated {kind.__name__}s, got {text!r}"
            )
        return values

    return parse


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ssltrain eval`` arguments."""
    parser.add_argument("target", metavar="RUN_DIR|CHECKPOINT", help="runs/<name>, or a checkpoint directory")
    parser.add_argument("--checkpoint", help="with a run directory: this checkpoint instead of the latest")
    parser.add_argument("--probe", choices=["all", "knn", "linear"], default="all", help="which probes (default all)")
    parser.add_argument("--data", metavar="DIR", help="shard directory holding train-*.tar and val-*.tar")
    parser.add_argument(
        "--train-data", metavar="SHARDS", help="labeled shards for the kNN bank / linear-probe training"
    )
    parser.add_argument("--val-data", metavar="SHARDS", help="labeled held-out shards the probes are scored on")
    parser.add_argument(
        "--knn-k", type=_list(int, "--knn-k"), metavar="K,K,...", help="default 10,20,100 (+ eval.knn_k)"
    )
    parser.add_argument("--knn-temperature", type=float, help="default eval.knn_temperature")
    parser.add_argument(
        "--linear-lr", type=_list(float, "--linear-lr"), metavar="LR,...", help="sweep, default 0.01,0.1,1"
    )
    parser.add_argument(
        "--linear-wd", type=_list(float, "--linear-wd"), metavar="WD,...", help="sweep, default 1e-5,1e-3"
    )
    parser.add_argument("--linear-epochs", type=int, help="default eval.linear_epochs")
    parser.add_argument("--batch-size", type=int, help="extraction batch per rank (default eval.batch_size)")
    parser.add_argument("--workers", type=int, help="data loader workers (default data.workers)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: the run's device setting)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write <run>/features/")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init comparison (half the time)")
    parser.add_argument("--spectrum-rows", type=int, default=2048, help="val rows for the spectrum and monitors")
    parser.add_argument("--out", help="results directory for a checkpoint outside a run (default <checkpoint>-eval)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate report.md afterwards")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """EvalOptions from parsed ``ssltrain eval`` arguments."""
    from ssltrain.eval.evaluate import PROBES, EvalOptions

    train, val = args.train_data, args.val_data
    if args.data:
        train = train or str(Path(args.data) / "train-*.tar")
        val = val or str(Path(args.data) / "val-*.tar")
    return EvalOptions(
        probes=PROBES if args.probe == "all" else (args.probe,),
        train_data=train,
        val_data=val,
        knn_ks=args.knn_k,
        knn_temperature=args.knn_temperature,
        linear_lrs=args.linear_lr,
        linear_weight_decays=args.linear_wd,
        linear_epochs=args.linear_epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        cache=not args.no_cache,
        random_baseline=not args.no_random,
        spectrum_rows=args.spectrum_rows,
        out_dir=Path(args.out) if args.out else None,
    )


def _init_distributed_from_env(device: str | None) -> bool:
    """Join the torchrun/Slurm process group when there is one and none exists yet; True if we created it."""
    import torch  # here, not at the top: `ssltrain eval --help` stays instant

    from ssltrain.core.collectives import is_distributed
    from ssltrain.core.process_group import init_distributed

    if is_distributed():
        return False
    wanted = device or "auto"
    use_cuda = wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
    return init_distributed(torch.device("cuda" if use_cuda else "cpu")).world_size > 1


def cmd_eval(args: argparse.Namespace) -> None:
    """Probe, print the table and warnings, and refresh the run's report."""
    from ssltrain.eval.evaluate import evaluate_target, format_table, resolve_target

    opts = options_from_args(args)
    created = _init_distributed_from_env(args.device)
    try:
        target = resolve_target(Path(args.target), Path(args.checkpoint) if args.checkpoint else None, opts.out_dir)
        results = evaluate_target(target, opts)
    finally:
        if created:
            from ssltrain.core.process_group import shutdown

            shutdown()
    if not results:  # a rank other than 0
        return
    print(format_table(results, target.step))
    print(f"results: {target.out_dir / 'eval.json'}")
    if target.is_run and not args.no_report:
        from ssltrain.eval.report import write_report

        print(f"report: {write_report(target.out_dir)}")


EVAL_DESCRIPTION = (
    "Probe a run's latest checkpoint (or a given one) on frozen features, next to a random-init backbone: kNN "
    "(cosine, temperature-weighted vote) for several k and a linear probe whose lr / weight decay are chosen on a "
    "held-out slice of train. Features are cached in <run>/features/. --data DIR is short for "
    "--train-data 'DIR/train-*.tar' --val-data 'DIR/val-*.tar'; without either, eval.train / eval.val of the "
    "run's config are used."
)


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "eval", help="kNN and linear probes of a checkpoint vs. a random-init backbone", description=EVAL_DESCRIPTION
    )
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)
    return parser


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ssltrain report`` arguments."""
    parser.add_argument("run_dir", help="runs/<name>")
    parser.add_argument(
        "--spectrum-images",
        type=int,
        default=1024,
        help="samples for the spectrum when spectrum.json is missing or stale (default 1024)",
    )
    parser.add_argument(
        "--no-spectrum", action="store_true", help="never compute the spectrum (use spectrum.json as is)"
    )


def cmd_report(args: argparse.Namespace) -> None:
    """Regenerate runs/<name>/report.md and its plots."""
    from ssltrain.eval.report import write_report

    print(f"report: {write_report(Path(args.run_dir), not args.no_spectrum, args.spectrum_images)}")


def add_report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("report", help="write runs/<name>/report.md with plots from metrics.jsonl and eval.json")
    add_report_arguments(parser)
    parser.set_defaults(func=cmd_report)
    return parser
