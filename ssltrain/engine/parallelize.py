"""Data-parallel wrapping of a Method: DDP (optionally with SyncBatchNorm) or FSDP2 (``fully_shard``).

The Method object stays the thing the loop calls hooks on (``on_step_start``, ``monitors``, ...); the wrapper
returned here is only what the forward and backward go through. Parameters tagged ``ssltrain_sharded`` (DIET's
N-way head, whose rows differ per rank) are kept out of both: averaging them over ranks would mix different rows.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssltrain.engine.apex_probe import load_apex
from ssltrain.core.collectives import is_distributed, world_size

log = logging.getLogger("ssltrain")


def sharded_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if getattr(p, "ssltrain_sharded", False)]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one at a time: residual stages of ResNets, transformer blocks of ViTs.

    Found by type anywhere in the Method, so the teacher copies of BYOL/DINO are sharded exactly like the student
    and the EMA update pairs shards of the same shape.
    """
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import ResNet

    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, ResNet):
            units += [module.layer1, module.layer2, module.layer3, module.layer4]
        elif isinstance(module, VisionTransformer):
            units += list(module.blocks)
    return units


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


APEX_SYNC_BN_MISSING = (
    "dist.sync_bn_impl=apex, but apex.parallel.SyncBatchNorm cannot be imported with its CUDA extension "
    "(syncbn). It ships in the NGC PyTorch containers (the Dockerfile builds on one; see docs/docker.md). Or set "
    "dist.sync_bn_impl=native: torch's SyncBatchNorm computes the same statistics.")


def _apex_parallel():
    """``apex.parallel`` with its compiled ``syncbn`` extension, or None."""
    return load_apex("parallel", "syncbn")  # syncbn: apex's optimized kernels


def resolve_sync_bn_impl(impl: str) -> str:
    """'apex' or 'native' for ``dist.sync_bn_impl``; ``apex`` where apex cannot run is a ConfigError.

    ``auto`` is torch's: its SyncBatchNorm is the port of apex's Welford kernels, keeps channels_last inputs in
    NHWC, and is maintained with torch; apex's is chosen only when asked for (run bench/syncbn.py on the cluster to
    decide).
    """
    if impl == "apex":
        if _apex_parallel() is None:
            from ssltrain.config import ConfigError

            raise ConfigError(APEX_SYNC_BN_MISSING)
        return "apex"
    return "native"


def convert_sync_batchnorm(model: nn.Module, device: torch.device, impl: str = "auto") -> nn.Module:
    """SyncBatchNorm over all ranks: batch statistics of the global batch, as a single process would compute.

    Must run before the optimizer is built (it replaces modules, keeping their parameters). Both implementations
    run on GPUs only: on CPU the request is refused with a warning rather than failing the run.
    """
    chosen = resolve_sync_bn_impl(impl)  # apex asked for and missing fails everywhere, not only on the cluster
    if not is_distributed():
        return model
    if device.type != "cuda":
        log.warning("dist.sync_bn=true ignored: SyncBatchNorm needs CUDA (each rank normalises its own batch)")
        return model
    if chosen == "apex":
        return _apex_parallel().convert_syncbn_model(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_model(model: nn.Module, strategy: str, device: torch.device, bf16_params: bool = False) -> nn.Module:
    """Return the module to run forward/backward through: the model itself, DDP(model), or model after fully_shard.

    ``strategy='fsdp'`` shards every residual stage / transformer block, then the rest at the root, with
    ``bf16_params`` turning on FSDP2's bf16 parameter all-gather (fp32 gradient reduction). Models with
    BatchNorm keep fp32 parameters (BatchNorm needs its weight in the dtype of its running statistics) and get
    bf16 compute from autocast instead.
    """
    if not is_distributed():
        return model
    sharded = sharded_parameter_names(model)
    if strategy == "ddp":
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy != "fsdp":
        raise ValueError(f"dist.strategy is {strategy!r}; choose ddp or fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    use_bf16 = bf16_params and not _has_batch_norm(model)
    if bf16_params and not use_bf16:
        log.info("FSDP: parameters stay fp32 (the model has BatchNorm); autocast computes in bf16")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    ignored = {p for name, p in model.named_parameters() if name in set(sharded)}
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    return model
