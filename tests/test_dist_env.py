"""Where a process sits in the job, from torchrun's or Slurm's variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from ssltrain.core.process_group import DistEnv, _first_slurm_host, backend_for, read_env, read_rank


def test_torchrun_variables_win_over_slurm() -> None:
    env = read_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n0",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
        }
    )
    assert env == DistEnv(3, 8, 1, "n0", 1234, "torchrun")


def test_slurm_tasks_without_torchrun() -> None:
    env = read_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-[07-08]",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_port == 20000 + 4242 % 20000  # the same on every task of the job, distinct across jobs
    assert env.master_addr in ("gpu-07",)  # scontrol's answer or the parsed one agree


def test_a_single_slurm_task_or_no_launcher_is_a_single_process() -> None:
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    assert read_env({}) == DistEnv()


def test_node_list_parsing_without_scontrol() -> None:
    assert _first_slurm_host("node[01-04],gpu7") in ("node01",)
    assert _first_slurm_host("a1,a2") == "a1"


def test_gpu_jobs_get_gloo_beside_nccl_for_host_side_collectives() -> None:
    """agree() and the skipped-sample counts reduce CPU tensors: NCCL alone refuses them (checked on GPUs only)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    assert backend_for(torch.device("cpu")) == "gloo"
    mapping = BackendConfig(Backend(backend_for(torch.device("cuda", 0)))).get_device_backend_map()
    assert mapping == {"cpu": "gloo", "cuda": "nccl"}


def test_read_rank_agrees_with_read_env_without_asking_scontrol() -> None:
    for env in (
        {"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
        {},
    ):
        assert read_rank(env) == read_env({**env, "MASTER_ADDR": "n0"}).rank


HUNG_RANK = """
import sys, time, torch, torch.distributed as dist
from ssltrain.core.process_group import explain_timeouts, init_distributed
env = init_distributed(torch.device("cpu"), timeout_s=2)
with explain_timeouts(2):
    if env.rank == 1:
        time.sleep(60)  # hung: far past rank 0's timeout and its check-in
    dist.all_reduce(torch.ones(3))
"""


@pytest.mark.distributed
def test_a_hung_rank_is_named_with_the_setting_that_bounds_the_wait() -> None:
    """Two real gloo processes; rank 1 sleeps past dist.timeout_s. gloo alone says "Timed out waiting 2000ms for recv
    operation": rank 0's error must name rank 1 and dist.timeout_s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", HUNG_RANK], env=env, stderr=subprocess.PIPE, text=True))
    try:
        err0 = procs[0].communicate(timeout=50)[1]
        assert procs[1].poll() is None, "rank 0 must give up after the timeout, not wait for the hung rank"
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert "CollectiveTimeout: rank 0: a collective waited dist.timeout_s=2s" in err0, err0
    assert "rank 1 did not answer" in err0 and "raise it if" in err0, err0
