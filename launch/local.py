"""torchrun launcher: ``ssltrain train`` on N local processes, or one node of a multi-node run without Slurm.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, from which ``ssltrain.engine.loop`` builds its process
group; nothing here touches torch.distributed itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence


def torchrun_command(
    config: str,
    overrides: Sequence[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "ssltrain",
    max_restarts: int = 0,
) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line.

    One node: ``--standalone`` (torchrun picks a free port, so two local runs do not collide). Several nodes: either a
    c10d rendezvous at ``rdzv_endpoint`` (node ranks assigned on arrival, nodes may restart) or the static
    ``master_addr``/``master_port`` + ``node_rank`` scheme.
    """
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be positive, got {nproc} and {nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    elif nnodes > 1:
        if master_addr is None or node_rank is None:
            raise ValueError("several nodes need --rdzv-endpoint HOST:PORT, or --master-addr and --node-rank")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}"]
        if master_port is not None:
            cmd.append(f"--master-port={master_port}")
    else:
        cmd.append("--standalone")
    return cmd + ["-m", "ssltrain.cli", "train", config, *overrides]


def run(cmd: Sequence[str]) -> int:
    """Run torchrun in the foreground and return its exit code (non-zero if any worker failed).

    SIGTERM sent to this process is passed on to torchrun, which passes it to the workers (they checkpoint at the
    next step boundary); Ctrl-C reaches torchrun from the terminal itself, so here it only means: wait for it.
    """
    proc = subprocess.Popen(list(cmd))
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    except ValueError:  # not the main thread: no forwarding
        previous = None
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
