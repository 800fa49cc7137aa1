"""Model-speed set-up of the training step: channels_last ResNets and torch.compile'd backbones (``train.*``).

Both keep the math and change the kernels, so the rounding differs a little; neither changes parameter names, so
checkpoints, exports and the probes see the same state dict whichever is on.

- ``train.channels_last``: cuDNN's and oneDNN's fast convolutions read NHWC. The ResNet's weights are converted once
  and a forward pre-hook converts each input batch (a no-op when the loader already delivers NHWC). ``auto`` turns it
  on for ResNets on CUDA only: on CPU it was faster too (16-30% for ResNet-18 fwd+bwd on 2 cores), but the offline
  probes extract contiguous on CPU, and the online kNN must equal them. ViTs gain nothing (one strided conv).
- ``train.compile``: ``nn.Module.compile`` in place (the module keeps its parameters and names). It must run before
  DDP/FSDP wrapping: FSDP2 then shards compiled blocks, so under ``dist.strategy=fsdp`` each shard unit (residual
  stage, transformer block) is compiled on its own, the order torchtitan uses; under DDP the whole backbone is one
  graph, its gradients reduced after the compiled backward. Shapes are static (``dynamic=False``): multi-crop gives
  one graph per crop size, and a batch shrunk by skipped samples compiles once more.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ssltrain.config import Config

log = logging.getLogger("ssltrain")


def _resnets(model: nn.Module) -> list[nn.Module]:
    from torchvision.models import ResNet

    return [m for m in model.modules() if isinstance(m, ResNet)]


def _backbones(model: nn.Module) -> list[nn.Module]:
    """Every image or video backbone in the Method, teacher copies included (found by type, outermost only)."""
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import ResNet
    from torchvision.models.video.resnet import VideoResNet

    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (ResNet, VisionTransformer, VideoResNet)) and not any(m in f.modules() for f in found):
            found.append(m)
    return found


def channels_last_wanted(setting: str, model: nn.Module, device: torch.device) -> bool:
    """Whether ``train.channels_last`` (auto | True | False) converts this model's ResNets."""
    if setting == "False" or not _resnets(model):
        return False
    return setting == "True" or device.type == "cuda"


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
    if strategy == "fsdp":
        from ssltrain.engine.parallelize import shard_units

        return shard_units(model)
    return _backbones(model)


def apply_speed(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Apply ``cfg.train`` to the Method in place, before DDP/FSDP wrapping and before the optimizer is built."""
    if channels_last_wanted(cfg.train.channels_last, model, device):
        log.info("channels_last: %d ResNet(s) take NHWC inputs", use_channels_last(model))
    if cfg.train.compile:
        targets = compile_targets(model, cfg.dist.strategy)
        for module in targets:
            module.compile(mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode,
                           dynamic=False)
        log.info("torch.compile (mode %s): %d module(s); the first steps include compilation",
                 cfg.train.compile_mode, len(targets))
    return model
