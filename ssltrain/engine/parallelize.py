"""Everything that turns a built Method into what the step runs, in one function and one order (as torchtitan's
``parallelize``): SyncBatchNorm, channels_last, torch.compile, then DDP or FSDP2.

The Method object stays the thing the loop calls hooks on (``on_step_start``, EMA teachers, ...); the wrapper
returned here is only what the forward and backward go through. None of these steps renames a parameter, so
checkpoints, exports and the probes see the same state dict whichever is on; channels_last and compile keep the
math and change the kernels, so the rounding differs a little.

- ``dist.sync_bn``: batch statistics of the global batch (DDP only; CUDA only). torch's SyncBatchNorm by default,
  apex's on request (``dist.sync_bn_impl=apex``; ``bench/syncbn.py`` compares them on a cluster).
- ``train.channels_last``: cuDNN's and oneDNN's fast convolutions read NHWC. The ResNets' weights are converted once
  and a forward pre-hook converts each input batch. Unset (null), it is on for ResNets on CUDA only: the offline
  probes extract contiguous on CPU, and the online kNN must equal them. ViTs gain nothing (one strided conv).
- ``train.compile``: ``nn.Module.compile`` in place, before wrapping: FSDP2 then shards compiled blocks, so under
  ``fsdp`` each shard unit is compiled on its own (torchtitan's order); under DDP each whole backbone is one graph.
  Shapes are static: multi-crop gives one graph per crop size.
- DDP / FSDP2: parameters tagged ``ssltrain_sharded`` (DIET's N-way head, whose rows differ per rank) are kept out
  of both: averaging them over ranks would mix different rows.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssltrain.config import Config, ConfigError
from ssltrain.core.collectives import is_distributed, world_size
from ssltrain.engine.apex_probe import load_apex

log = logging.getLogger("ssltrain")

APEX_SYNC_BN_MISSING = (
    "dist.sync_bn_impl=apex, but apex.parallel.SyncBatchNorm cannot be imported with its CUDA extension "
    "(syncbn). It ships in the NGC PyTorch containers (the Dockerfile builds on one; see docs/docker.md). Or set "
    "dist.sync_bn_impl=native: torch's SyncBatchNorm computes the same statistics."
)


def parallelize(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Apply ``cfg.dist`` and ``cfg.train`` to the Method in place; return the module to run forward/backward through.

    Call before the optimizer is built: SyncBatchNorm replaces modules (keeping their parameters) and FSDP2 turns
    parameters into DTensors.
    """
    if cfg.dist.sync_bn and cfg.dist.strategy == "ddp":
        model = convert_sync_batchnorm(model, device, cfg.dist.sync_bn_impl)
    if channels_last_wanted(cfg.train.channels_last, model, device):
        log.info("channels_last: %d ResNet(s) take NHWC inputs", use_channels_last(model))
    if cfg.train.compile:
        targets = compile_targets(model, cfg.dist.strategy)
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        for module in targets:
            module.compile(mode=mode, dynamic=False)
        log.info(
            "torch.compile (mode %s): %d module(s); the first steps include compilation",
            cfg.train.compile_mode,
            len(targets),
        )
    return wrap_model(model, cfg.dist.strategy, device, bf16_params=cfg.dist.fsdp_bf16_params)


# --- finding the backbones ----------------------------------------------------------------------------------------


def backbones(model: nn.Module) -> list[nn.Module]:
    """Every image or video backbone in the Method, teacher copies included (found by type, outermost only)."""
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import ResNet
    from torchvision.models.video.resnet import VideoResNet

    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (ResNet, VisionTransformer, VideoResNet)) and not any(m in f.modules() for f in found):
            found.append(m)
    return found


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one at a time: residual stages of ResNets, transformer blocks of ViTs.

    The teacher copies of BYOL/DINO are found like the student, so they are sharded alike and the EMA update pairs
    shards of the same shape.
    """
    units: list[nn.Module] = []
    for net in backbones(model):
        blocks = getattr(net, "blocks", None)
        units += list(blocks) if blocks is not None else [net.get_submodule(f"layer{i}") for i in range(1, 5)]
    return units


def sharded_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if getattr(p, "ssltrain_sharded", False)]


# --- SyncBatchNorm --------------------------------------------------------------------------------------------------


def _apex_parallel() -> ModuleType | None:
    """``apex.parallel`` with its compiled ``syncbn`` extension, or None."""
    return load_apex("parallel", "syncbn")


def resolve_sync_bn_impl(impl: str) -> str:
    """``dist.sync_bn_impl`` checked where it runs: ``apex`` where apex cannot run is a ConfigError."""
    if impl == "apex" and _apex_parallel() is None:
        raise ConfigError(APEX_SYNC_BN_MISSING)
    return impl


def convert_sync_batchnorm(model: nn.Module, device: torch.device, impl: str = "native") -> nn.Module:
    """SyncBatchNorm over all ranks: batch statistics of the global batch, as a single process would compute.

    Both implementations run on GPUs only: on CPU the request is refused with a warning rather than failing the run.
    """
    chosen = resolve_sync_bn_impl(impl)  # apex asked for and missing fails everywhere, not only on the cluster
    if not is_distributed():
        return model
    if device.type != "cuda":
        log.warning("dist.sync_bn=true ignored: SyncBatchNorm needs CUDA (each rank normalises its own batch)")
        return model
    apex = _apex_parallel() if chosen == "apex" else None
    if apex is not None:
        return apex.convert_syncbn_model(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --- channels_last and compile -------------------------------------------------------------------------------------


def _resnets(model: nn.Module) -> list[nn.Module]:
    from torchvision.models import ResNet

    return [m for m in backbones(model) if isinstance(m, ResNet)]


def channels_last_wanted(setting: bool | None, model: nn.Module, device: torch.device) -> bool:
    """Whether ``train.channels_last`` (true | false | null: ResNets on CUDA) converts this model's ResNets."""
    if setting is False or not _resnets(model):
        return False
    return setting is True or device.type == "cuda"


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if isinstance(x, Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def use_channels_last(model: nn.Module) -> int:
    """Convert every 2-D ResNet in ``model`` (weights now, inputs at each call); returns how many."""
    resnets = _resnets(model)
    for net in resnets:
        net.to(memory_format=torch.channels_last)
        net.register_forward_pre_hook(_to_channels_last)
    return len(resnets)


def compile_targets(model: nn.Module, strategy: str) -> list[nn.Module]:
    """What ``train.compile`` compiles: FSDP's shard units under fsdp, else each whole backbone."""
    return shard_units(model) if strategy == "fsdp" else backbones(model)


# --- data parallelism -----------------------------------------------------------------------------------------------


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, strategy: str, device: torch.device, bf16_params: bool = False) -> nn.Module:
    """The model itself (one process), DDP(model), or the model after ``fully_shard``.

    ``fsdp`` shards every residual stage / transformer block, then the rest at the root, with ``bf16_params``
    turning on FSDP2's bf16 parameter all-gather (fp32 gradient reduction). Models with BatchNorm keep fp32
    parameters (BatchNorm needs its weight in the dtype of its running statistics) and get bf16 compute from
    autocast instead.
    """
    if not is_distributed():
        return model
    sharded = sharded_parameter_names(model)
    if strategy == "ddp":
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
        device_ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
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
