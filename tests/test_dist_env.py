"""Where a process sits in the job, from torchrun's or Slurm's variables."""

from __future__ import annotations

import torch

from ssltrain.core.process_group import DistEnv, _first_slurm_host, backend_for, read_env


def test_torchrun_variables_win_over_slurm() -> None:
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(3, 8, 1, "n0", 1234, "torchrun")


def test_slurm_tasks_without_torchrun() -> None:
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                    "SLURM_JOB_NODELIST": "gpu-[07-08]"})
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
