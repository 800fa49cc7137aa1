"""Every method's loss on a batch, on one process or split over several (gloo), for the equivalence tests.

The "images" are feature vectors and the backbone is the identity, so the test isolates what distribution can
break: the loss's batch statistics, gathers and all-reduces. Heads are single Linear layers (no BatchNorm, whose
per-rank statistics are SyncBN's business, not the loss's).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssltrain import config as C
from ssltrain.data.loaders import Views
from ssltrain.methods.barlow_twins import BarlowTwins
from ssltrain.methods.base import Method
from ssltrain.methods.byol import BYOL
from ssltrain.methods.cissl import CISSL
from ssltrain.methods.diet import DIET
from ssltrain.methods.dino import DINO
from ssltrain.methods.dinov2 import DINOv2
from ssltrain.methods.dissl import DISSL
from ssltrain.methods.ijepa import IJEPA
from ssltrain.methods.lejepa import LeJEPA
from ssltrain.methods.mae import MAE
from ssltrain.methods.mocov3 import MoCoV3
from ssltrain.methods.simclr import SimCLR
from ssltrain.methods.swav import SwAV
from ssltrain.methods.vcreg import VCReg
from ssltrain.methods.vicreg import VICReg
from ssltrain.methods.vicreg_logdet import VICRegLogDet
from ssltrain.methods.vicreg_pairwise import VICRegPairwise
from ssltrain.models.backbones import ViT

DIM, OUT, BATCH, NUM_SAMPLES = 6, 5, 8, 13
METHODS = [
    "vicreg",
    "vicreg_logdet",
    "vicreg_pairwise",
    "vcreg",
    "simclr",
    "barlow_twins",
    "diet",
    "cissl",
    "dissl",
    "byol",
    "mocov3",
    "dino",
    "swav",
    "swav_queue",
    "lejepa",
    "dinov2",
    "dinov2_centering",
    "mae",
    "ijepa",
]


def make_method(name: str) -> Method:
    torch.manual_seed(1234)  # same parameters on every rank, as DDP's broadcast would make them
    backbone, proj = nn.Identity(), [OUT]
    if name == "vicreg":
        return VICReg(backbone, DIM, proj, C.VICRegConfig())
    if name == "vicreg_logdet":
        return VICRegLogDet(backbone, DIM, proj, C.VICRegLogDetConfig())
    if name == "vicreg_pairwise":
        return VICRegPairwise(backbone, DIM, proj, C.VICRegPairwiseConfig(sigma=2.0))
    if name == "vcreg":
        return VCReg(backbone, DIM, proj, C.VCRegConfig())
    if name == "simclr":
        return SimCLR(backbone, DIM, proj, C.SimCLRConfig(temperature=0.5))
    if name == "barlow_twins":
        return BarlowTwins(backbone, DIM, proj, C.BarlowTwinsConfig(lambd=0.1))
    if name == "diet":
        return DIET(backbone, DIM, NUM_SAMPLES, C.DIETConfig())
    if name == "cissl":
        return CISSL(backbone, DIM, proj, C.CISSLConfig(temperature=0.5, head_batchnorm=False))
    if name == "dissl":
        return DISSL(backbone, DIM, proj, C.DISSLConfig(classes=7))
    if name == "byol":
        return BYOL(backbone, DIM, proj, C.BYOLConfig(predictor=[OUT]))
    if name == "mocov3":
        cfg = C.MoCoV3Config(predictor=[OUT], temperature=0.5, projector_last_bn=False, predictor_last_bn=False)
        return MoCoV3(backbone, DIM, proj, cfg)
    if name == "dino":
        return DINO(backbone, DIM, C.DINOConfig(out_dim=9, hidden_dim=8, bottleneck_dim=4, teacher_temperature=0.2))
    if name == "swav":
        return SwAV(backbone, DIM, proj, C.SwAVConfig(prototypes=7, epsilon=0.5))
    if name == "lejepa":  # SIGReg's empirical characteristic function is all-reduced with autograd
        return LeJEPA(backbone, DIM, proj, C.LeJEPAConfig(lambd=0.3, num_slices=7))
    if name == "swav_queue":  # the queue holds the first batch's embeddings when the measured one runs
        return SwAV(backbone, DIM, proj, C.SwAVConfig(prototypes=7, epsilon=0.5, queue_size=BATCH))
    if name == "mae":  # a 2x2 grid of 4-px patches, 1 kept per view; each sample's own mask from its position
        vit = ViT(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
        return MAE(vit, 8, C.MAEConfig(decoder_dim=8, decoder_depth=1, decoder_heads=2), grid=2, views=2)
    if name == "ijepa":  # a 4x4 grid of 2-px patches; the masks' group is the whole batch, truncated over it
        vit = ViT(img_size=8, patch_size=2, embed_dim=8, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
        return IJEPA(vit, 8, C.IJEPAConfig(predictor_depth=1, predictor_width=8, num_targets=2, min_keep=0), (4, 4))
    if name in ("dinov2", "dinov2_centering"):  # a 4x4 grid of 2-px patches, one register; KoLeo gathers the CLS
        vit = ViT(img_size=8, patch_size=2, embed_dim=8, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True,
                  reg_tokens=1, no_embed_class=True)  # fmt: skip
        centering = "centering" if name == "dinov2_centering" else "sinkhorn_knopp"
        temps = {"teacher_temperature": 0.2, "warmup_teacher_temperature": 0.2}
        cfg = C.DINOv2Config(out_dim=9, hidden_dim=8, bottleneck_dim=4, centering=centering, **temps)
        cfg.mask_sample_probability = 0.75
        return DINOv2(vit, 8, cfg, (4, 4))
    raise ValueError(name)


# Methods that read patch tokens (masked and predictive ones) run on a small ViT over images of this shape.
IMAGE_SHAPE = (3, 8, 8)
IMAGE_METHODS: set[str] = {"mae", "ijepa", "dinov2", "dinov2_centering"}


def full_batch(name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two views (float64) of BATCH samples and their dataset indices, fixed per method."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shape = IMAGE_SHAPE if name in IMAGE_METHODS else (DIM,)
    views = [torch.randn(BATCH, *shape, generator=g, dtype=torch.float64) for _ in range(2)]
    index = torch.randperm(NUM_SAMPLES, generator=g)[:BATCH]
    return views, index


OUTPUTS = ("embeddings", "features")  # the forward's (B, D) outputs for the monitors; the other keys are 0-d terms


def run(name: str, rank: int = 0, world: int = 1, ddp: bool = False) -> dict[str, torch.Tensor]:
    """Loss, input gradients, parameter gradients (DDP-averaged if replicated), buffers and the forward's outputs
    after one step. ``ddp``: the measured forward and backward run through DistributedDataParallel, as in training
    (sharded parameters left to the method), instead of averaging the gradients here."""
    method = make_method(name).double()
    views, index = full_batch(name)
    b = BATCH // world
    xs = [v[rank * b : (rank + 1) * b].clone().requires_grad_(True) for v in views]
    if name == "swav_queue":  # fill the queue with another batch (the views' rows reversed) first
        method.on_step_start(0, 1)
        method(Views([v.flip(0)[rank * b : (rank + 1) * b] for v in views], [], index[rank * b : (rank + 1) * b], None))
    model: nn.Module = method
    sharded = [n for n, p in method.named_parameters() if getattr(p, "ssltrain_sharded", False)]
    if ddp and any(p.requires_grad and n not in sharded for n, p in method.named_parameters()):  # DIET here: none
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, sharded)
        model = DistributedDataParallel(method)
    batch = Views(xs, [], index[rank * b : (rank + 1) * b], None, position=torch.arange(rank * b, (rank + 1) * b))
    if method.masks is not None:  # drawn for the whole batch's positions: each rank takes its rows
        masks = method.masks(np.arange(BATCH), 0, BATCH)
        batch.masks = {k: m[rank * b : (rank + 1) * b] for k, m in masks.items()}
    out = model(batch)
    out["loss"].backward()
    result = {"loss": out["loss"].detach()}
    for k, v in out.items():
        if k in OUTPUTS:
            result[f"output/{k}"] = v.detach()
            result[f"output_detached/{k}"] = torch.tensor(not v.requires_grad and v.grad_fn is None)
        else:
            result[f"term/{k}"] = v.detach()
    for i, x in enumerate(xs):
        result[f"input_grad/{i}"] = x.grad
    for pname, p in method.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.clone()
        if world > 1 and not ddp and not getattr(p, "ssltrain_sharded", False):
            torch.distributed.all_reduce(grad)  # what DDP does to replicated parameters: average
            grad /= world
        result[f"param_grad/{pname}"] = grad
    for bname, buf in method.named_buffers():
        result[f"buffer/{bname}"] = buf.detach().clone()
    return result
