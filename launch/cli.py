"""``ssltrain launch slurm|local``: the config is resolved here, in the login shell, so a typo fails in a second
rather than after hours in the queue."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from ssltrain.config import Config, load_config, to_yaml
from ssltrain.launch import local, slurm
from ssltrain.launch.preflight import preflight

log = logging.getLogger("ssltrain")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/vicreg_resnet50_imagenet.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=2048")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``launch`` (with ``slurm`` and ``local``) to ssltrain's subcommands."""
    launch = subparsers.add_parser("launch", help="run training on Slurm (submitit, requeue) or under torchrun")
    sub = launch.add_subparsers(dest="launcher", required=True)

    s = sub.add_parser(
        "slurm",
        help="submit to Slurm: one task per GPU, requeued on timeout and preemption",
        description="Submit a training job through submitit. The job checkpoints and requeues itself "
        "on the pre-deadline USR2 signal and resumes from the latest checkpoint.",
    )
    _add_config_args(s)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU-only)")
    s.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU, 1 without GPUs)")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (data workers + 1 or more)")
    s.add_argument("--mem-gb", type=float, help="memory per node in GB")
    s.add_argument("--partition")
    s.add_argument("--time", default="1440", help="time limit per allocation: minutes or [D-]HH:MM:SS (default 1440)")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="USR2 this many seconds before the limit: one step plus a checkpoint must fit (default 120)",
    )
    s.add_argument("--max-requeues", type=int, default=10, help="requeues after time-outs (default 10)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the sbatch script and the config; submit nothing",
    )
    s.add_argument(
        "--wait", action="store_true", help="block until the job ends (through requeues); exit 1 unless it completed"
    )
    s.set_defaults(func=cmd_slurm)

    t = sub.add_parser(
        "local",
        help="torchrun on this machine (or one node of a multi-node run)",
        description="Runs python -m torch.distributed.run ... -m ssltrain.cli train CONFIG [overrides]; "
        "exits with its exit code.",
    )
    _add_config_args(t)
    t.add_argument("--nproc", type=int, required=True, help="processes (ranks) on this node, e.g. the GPU count")
    t.add_argument("--nnodes", type=int, default=1)
    t.add_argument("--node-rank", type=int, help="this node's rank (static rendezvous with --master-addr)")
    t.add_argument("--master-addr", help="host of node rank 0 (static rendezvous)")
    t.add_argument("--master-port", type=int)
    t.add_argument("--rdzv-endpoint", help="HOST:PORT of a c10d rendezvous (node ranks assigned on arrival)")
    t.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of failed workers (they resume)")
    t.set_defaults(func=cmd_local)


def _spec(args: argparse.Namespace) -> slurm.SlurmSpec:
    try:
        return slurm.spec_from_flags(args, args.nodes, args.tasks_per_node)
    except ValueError as err:  # a --time sbatch would not take, or one the signal delay does not fit in
        _fail(args, str(err))


def _checked(args: argparse.Namespace, world_size: int) -> Config:
    """The config, checked against ``world_size`` ranks, the data and the run directory; its warnings printed."""
    cfg = load_config(args.config, args.overrides)
    for warning in preflight(cfg, world_size):
        log.warning(warning)
    return cfg


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> NoReturn:
    print(f"ssltrain launch {args.launcher}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def cmd_slurm(args: argparse.Namespace) -> None:
    spec = _spec(args)
    cfg = slurm.resolve(_checked(args, spec.world_size))
    if args.dry_run:
        print(slurm.sbatch_script(cfg, spec))
        print("# the config the job runs (out_dir and data paths made absolute for the compute nodes):")
        print("\n".join(f"# {line}" for line in to_yaml(cfg).splitlines()))
        return
    try:
        job = slurm.submit(cfg, spec)
    except RuntimeError as err:  # no sbatch here, or sbatch refused the job
        _fail(args, str(err))
    print(f"submitted slurm job {job.job_id}")
    print(f"run directory: {cfg.run_dir}")
    print(f"logs: {job.paths.stdout} / {job.paths.stderr}".replace("%t", "0"))
    if args.wait:
        state = slurm.wait(job.job_id)
        print(f"slurm job {job.job_id}: {state}")
        if state != "COMPLETED":
            raise SystemExit(1)


def cmd_local(args: argparse.Namespace) -> None:
    if args.nproc < 1 or args.nnodes < 1:
        _fail(args, f"--nproc and --nnodes must be positive, got {args.nproc} and {args.nnodes}")
    _checked(args, args.nproc * args.nnodes)  # fail here, in one line, rather than in each of N processes
    try:
        cmd = local.torchrun_command(
            args.config,
            args.overrides,
            args.nproc,
            args.nnodes,
            args.node_rank,
            args.master_addr,
            args.master_port,
            args.rdzv_endpoint,
            max_restarts=args.max_restarts,
        )
    except ValueError as err:
        _fail(args, str(err))
    code = local.run(cmd)
    if code:
        raise SystemExit(code)
