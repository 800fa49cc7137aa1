"""DINOv2 (ssltrain.losses.dinov2, ssltrain.methods.dinov2, ssltrain.data.masks.blocks) against transcriptions of the
official code (facebookresearch/dinov2 at b8931f7: dinov2/loss/dino_clstoken_loss.py ``DINOLoss``,
dinov2/loss/ibot_patch_loss.py ``iBOTPatchLoss``, dinov2/loss/koleo_loss.py ``KoLeoLoss``, dinov2/data/masking.py
``MaskingGenerator``, dinov2/data/collate.py's mask weights and dinov2/train/ssl_meta_arch.py ``forward_backward``'s
loss composition, dinov2/utils/param_groups.py ``get_vit_lr_decay_rate``) in float64, values and input gradients;
KoLeo on three points by hand; masks as a function of (seed, position); training and exact resume through the real
loop. The 2- and 4-process equality is in test_distributed_losses (dist_cases "dinov2", "dinov2_centering")."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_params, final_params, tiny_config
from torch import nn

from ssltrain import config as C
from ssltrain.data.loaders import Views
from ssltrain.data.masks.blocks import BlockMasks, block_mask
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.losses.dinov2 import (
    dinov2_dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)
from ssltrain.methods.dinov2 import DINOv2
from ssltrain.models.backbones import build_backbone

F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- Transcriptions of the official code (single process: no torch.distributed calls; float64: no .float()) ------


class _OfficialDINOLoss(nn.Module):
    """dinov2/loss/dino_clstoken_loss.py ``DINOLoss`` (world size 1)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=F64))
        self.updated = True
        self.len_teacher_output = None
        self.async_batch_center = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        world_size = 1
        Q = torch.exp(teacher_output / teacher_temp).t()
        B = Q.shape[1] * world_size
        K = Q.shape[0]
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            Q /= sum_of_rows
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                loss = torch.sum(t * lsm, dim=-1)
                total_loss -= loss.mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = torch.sum(teacher_output, dim=0, keepdim=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            _t = self.async_batch_center / (self.len_teacher_output * 1)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class _OfficialiBOTPatchLoss(nn.Module):
    """dinov2/loss/ibot_patch_loss.py ``iBOTPatchLoss`` (world size 1; ``lossfunc`` without xformers)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim, dtype=F64))
        self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        Q = torch.exp(teacher_output / teacher_temp).t()
        B = n_masked_patches_tensor
        K = Q.shape[0]
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            Q /= sum_of_rows
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    def forward_masked(
        self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat, n_masked_patches=None,
        masks_weight=None,
    ):  # fmt: skip
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            _t = self.async_batch_center / (self.len_teacher_patch_tokens * 1)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class _OfficialKoLeoLoss(nn.Module):
    """dinov2/loss/koleo_loss.py ``KoLeoLoss`` (without the autocast context)."""

    def __init__(self) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])
        return -torch.log(distances + eps).mean()


class _OfficialMaskingGenerator:
    """dinov2/data/masking.py ``MaskingGenerator``; the module ``random`` is a ``random.Random`` passed in."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, rng=None):  # fmt: skip
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.random = rng

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        random = self.random
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def _official_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    """dinov2/utils/param_groups.py ``get_vit_lr_decay_rate`` (names of the backbone module, not chunked)."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        embeddings = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
        if any(f".{k}" in name for k in embeddings):  # noqa: SIM114 (the official's branches, kept apart)
            layer_id = 0
        elif force_is_backbone and any(k in name for k in embeddings):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


# --- The losses --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [0.04, 0.07])
def test_sinkhorn_knopp_teacher_matches_official(temp: float) -> None:
    logits = _randn(10, 7, seed=1).tanh()  # a normalised head's range
    ours = sinkhorn_knopp_teacher(logits, temp, 3)
    torch.testing.assert_close(ours, _OfficialDINOLoss(7).sinkhorn_knopp_teacher(logits.clone(), temp), rtol=1e-12,
                               atol=1e-14)  # fmt: skip
    official_ibot = _OfficialiBOTPatchLoss(7).sinkhorn_knopp_teacher(logits.clone(), temp, torch.tensor(10))
    torch.testing.assert_close(ours, official_ibot, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(10, dtype=F64))
    many = sinkhorn_knopp_teacher(logits, temp, 200)  # the prototypes' marginals become uniform: B / K each
    torch.testing.assert_close(many.sum(dim=0), torch.full((7,), 10 / 7, dtype=F64), rtol=1e-6, atol=1e-6)


def test_sinkhorn_knopp_teacher_takes_an_empty_rank() -> None:
    assert sinkhorn_knopp_teacher(torch.zeros(0, 5, dtype=F64), 0.1).shape == (0, 5)


def test_softmax_center_teacher_matches_official() -> None:
    official = _OfficialDINOLoss(6)
    center = torch.zeros(6, dtype=F64)
    for step in range(3):
        t = _randn(8, 6, seed=10 + step)
        ours = softmax_center_teacher(t, center, 0.04)
        torch.testing.assert_close(ours, official.softmax_center_teacher(t, 0.04), rtol=1e-12, atol=1e-14)
        official.update_center(t)
        center = center * 0.9 + t.mean(0) * 0.1  # what DINO._update_center does on one process


@pytest.mark.parametrize("num_local", [0, 1, 3])
def test_dino_term_matches_official_forward_backward(num_local: int) -> None:
    """``SSLMetaArch.forward_backward``'s local and global DINO terms (two global crops), values and gradients."""
    b, k = 5, 9
    official = _OfficialDINOLoss(k)
    glob = [_randn(b, k, seed=i).requires_grad_() for i in range(2)]
    local = [_randn(b, k, seed=10 + i).requires_grad_() for i in range(num_local)]
    teacher = [F.softmax(_randn(b, k, seed=20 + i) / 0.1, dim=-1) for i in range(2)]

    ours = dinov2_dino_loss(glob, local, teacher, 0.1)
    g_ours = torch.autograd.grad(ours, glob + local)

    terms = 2 * 1 + max(num_local * 2, 1)  # n_global_crops_loss_terms + n_local_crops_loss_terms
    ref = 0
    if num_local:
        ref = official(local, teacher) / terms
    swapped = torch.cat([teacher[1], teacher[0]])  # the teacher's crops "chunked and cat'd in reverse"
    ref = ref + official([torch.cat(glob)], [swapped]) * 2 / terms
    g_ref = torch.autograd.grad(ref, glob + local)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-14)


def test_ibot_patch_loss_matches_official_forward_masked() -> None:
    rows, n, k = 6, 8, 7
    masks = torch.rand(rows, n, generator=torch.Generator().manual_seed(3)) < 0.4
    masks[2] = False  # a row without mask
    m = int(masks.sum())
    student = _randn(m, k, seed=4).requires_grad_()
    teacher = F.softmax(_randn(m, k, seed=5) / 0.07, dim=-1)
    # the official collate's weights (dinov2/data/collate.py), a padded buffer as forward_backward builds
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    padded = torch.cat([student, torch.zeros(3, k, dtype=F64)])
    ref = _OfficialiBOTPatchLoss(k).forward_masked(padded[:m], teacher, masks, n_masked_patches=m,
                                                   masks_weight=masks_weight)  # fmt: skip
    ours = ibot_patch_loss(student, teacher, masks, 0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    (g_ref,) = torch.autograd.grad(ref, student)
    (g_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)


def test_koleo_matches_official() -> None:
    x = _randn(12, 5, seed=6).requires_grad_()
    ref = _OfficialKoLeoLoss()(x)
    ours = koleo_loss(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-10,
                               atol=1e-12)  # fmt: skip


def test_koleo_on_three_points_by_hand() -> None:
    """Unit vectors at 0, 60 and 180 degrees (the last one scaled: KoLeo normalises): nearest neighbours 0<->60
    (distance 1, twice) and 180->60 (distance 2 sin 60 = sqrt 3): loss = -(0 + 0 + log sqrt 3) / 3."""
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-5.0, 0.0]], dtype=F64)
    torch.testing.assert_close(koleo_loss(x), torch.tensor(-math.log(3) / 6, dtype=F64), rtol=0, atol=1e-7)


# --- Masks -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (4, 6)])
def test_block_mask_matches_official_generator(grid: tuple[int, int]) -> None:
    n = grid[0] * grid[1]
    for seed in range(40):
        count = int(n * random.Random(1000 + seed).uniform(0.1, 0.5))
        official = _OfficialMaskingGenerator(grid, max_num_patches=0.5 * n, rng=random.Random(seed))(count)
        ours = block_mask(grid, count, random.Random(seed), 4, 0.5 * n, 0.3)
        np.testing.assert_array_equal(ours, official)
        assert ours.sum() <= count


def test_block_masks_are_a_function_of_seed_and_position() -> None:
    gen = BlockMasks((8, 8), 2, 0.5, (0.1, 0.5))
    whole = gen(np.arange(64), 3, 64)["patches"]
    assert whole.shape == (64, 2, 64) and whole.dtype == torch.bool
    # the same samples in other batches, on other "ranks", in another order: the same rows
    odd = gen(np.arange(1, 64, 2)[::-1].copy(), 3, 32)["patches"]
    assert torch.equal(odd, whole[1::2].flip(0))
    assert not torch.equal(gen(np.arange(64), 4, 64)["patches"], whole)
    counts = whole.sum(-1).flatten().float()
    masked = counts > 0
    assert 0.3 < masked.float().mean() < 0.7  # probability 0.5 per (sample, view)
    assert counts[masked].min() >= 4 and counts.max() <= 32  # blocks of >= 4 patches, at most half the grid


# --- The method --------------------------------------------------------------------------------------------------


def _tiny_method(centering: str, separate: bool = False) -> DINOv2:
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_tiny", patch_size=4, image_size=16, registers=2)
    backbone.blocks = backbone.blocks[:2]  # two blocks are enough
    cfg = C.DINOv2Config(
        out_dim=11, hidden_dim=16, bottleneck_dim=8, teacher_temperature=0.07, warmup_teacher_temperature=0.07,
        centering=centering, ibot_separate_head=separate, ibot_out_dim=13,
    )  # fmt: skip
    method = DINOv2(backbone, dim, cfg, (4, 4)).double()
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        g = torch.Generator().manual_seed(7)
        for p in [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]:
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=F64))
        method.mask_token.copy_(0.1 * torch.randn(method.mask_token.shape, generator=g, dtype=F64))
    return method


def _official_step(method: DINOv2, glob: torch.Tensor, local: torch.Tensor, masks: torch.Tensor, num_local: int,
                   dino_loss: _OfficialDINOLoss, ibot_loss: _OfficialiBOTPatchLoss) -> torch.Tensor:  # fmt: skip
    """``SSLMetaArch.forward_backward`` (shared head; the heads and backbones are the method's, the student backbone
    called through ViT.tokens with the mask token), the collate's mask indices and weights; returns the loss."""
    cfg = method.cfg
    n_global_crops, teacher_temp = 2, cfg.teacher_temperature
    mask_indices_list = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n_masked_patches = mask_indices_list.shape[0]
    upperbound = n_masked_patches + 5
    n_local_crops_loss_terms = max(num_local * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    prefix = method.backbone.num_prefix_tokens

    with torch.no_grad():
        tokens = method.teacher_backbone.tokens(glob)
        teacher_cls_tokens = tokens[:, 0].chunk(n_global_crops)
        teacher_cls_tokens = torch.cat((teacher_cls_tokens[1], teacher_cls_tokens[0]))
        ibot_teacher_patch_tokens = tokens[:, prefix:]
        _dim = ibot_teacher_patch_tokens.shape[-1]
        n_cls_tokens = teacher_cls_tokens.shape[0]
        buffer_tensor_teacher = ibot_teacher_patch_tokens.new_zeros(upperbound + n_cls_tokens, _dim)
        buffer_tensor_teacher[:n_cls_tokens].copy_(teacher_cls_tokens)
        buffer_tensor_teacher[n_cls_tokens : n_cls_tokens + n_masked_patches] = torch.index_select(
            ibot_teacher_patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list
        )
        tokens_after_head = method.teacher_head(buffer_tensor_teacher)
        teacher_cls_tokens_after_head = tokens_after_head[:n_cls_tokens]
        masked_teacher_patch_tokens_after_head = tokens_after_head[n_cls_tokens : n_cls_tokens + n_masked_patches]
        if cfg.centering == "centering":
            teacher_dino = dino_loss.softmax_center_teacher(teacher_cls_tokens_after_head, teacher_temp=teacher_temp)
            teacher_dino = teacher_dino.view(n_global_crops, -1, *teacher_cls_tokens_after_head.shape[1:])
            dino_loss.update_center(teacher_cls_tokens_after_head)
            masked = masked_teacher_patch_tokens_after_head.unsqueeze(0)
            teacher_ibot = ibot_loss.softmax_center_teacher(masked[:, :n_masked_patches], teacher_temp=teacher_temp)
            teacher_ibot = teacher_ibot.squeeze(0)
            ibot_loss.update_center(masked[:n_masked_patches])
        else:
            teacher_dino = dino_loss.sinkhorn_knopp_teacher(teacher_cls_tokens_after_head, teacher_temp=teacher_temp)
            teacher_dino = teacher_dino.view(n_global_crops, -1, *teacher_cls_tokens_after_head.shape[1:])
            teacher_ibot = ibot_loss.sinkhorn_knopp_teacher(
                masked_teacher_patch_tokens_after_head, teacher_temp=teacher_temp,
                n_masked_patches_tensor=torch.tensor(n_masked_patches),
            )  # fmt: skip

    student_global = method.backbone.tokens(glob, mask=masks, mask_token=method.mask_token[0])
    student_local_cls_tokens = method.backbone.tokens(local)[:, 0]
    student_global_cls_tokens = student_global[:, 0]
    ibot_student_patch_tokens = student_global[:, prefix:]
    buffer_tensor_patch_tokens = ibot_student_patch_tokens.new_zeros(upperbound, _dim)
    buffer_tensor_patch_tokens[:n_masked_patches] = torch.index_select(
        ibot_student_patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list
    )
    inputs = [student_local_cls_tokens, student_global_cls_tokens, buffer_tensor_patch_tokens]
    outputs = list(method.head(torch.cat(inputs)).split([len(x) for x in inputs]))
    student_local_cls_tokens_after_head = outputs.pop(0)
    student_global_cls_tokens_after_head = outputs.pop(0)
    student_global_masked_patch_tokens_after_head = outputs.pop(0)[:n_masked_patches]

    loss_accumulator = 0
    dino_local_crops_loss = dino_loss(student_local_cls_tokens_after_head.chunk(num_local), teacher_dino) / (
        n_global_crops_loss_terms + n_local_crops_loss_terms
    )
    loss_accumulator += cfg.dino_loss_weight * dino_local_crops_loss
    loss_scales = 2
    dino_global_crops_loss = (
        dino_loss([student_global_cls_tokens_after_head], [teacher_dino.flatten(0, 1)])
        * loss_scales
        / (n_global_crops_loss_terms + n_local_crops_loss_terms)
    )
    loss_accumulator += cfg.dino_loss_weight * dino_global_crops_loss
    koleo = _OfficialKoLeoLoss()
    loss_accumulator += cfg.koleo_loss_weight * sum(koleo(p) for p in student_global_cls_tokens.chunk(2))
    ibot_patch_loss_value = (
        ibot_loss.forward_masked(
            student_global_masked_patch_tokens_after_head, teacher_ibot, student_masks_flat=masks,
            n_masked_patches=n_masked_patches, masks_weight=masks_weight,
        )
        * loss_scales
        * (1.0 / n_global_crops)
    )  # fmt: skip
    return loss_accumulator + cfg.ibot_loss_weight * ibot_patch_loss_value


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_method_matches_official_forward_backward(centering: str) -> None:
    """Two steps (the EMA centres move between them), values and gradients w.r.t. every crop."""
    method = _tiny_method(centering)
    official = copy.deepcopy(method)
    b, num_local = 5, 2
    dino, ibot = _OfficialDINOLoss(11), _OfficialiBOTPatchLoss(11)
    gen = BlockMasks((4, 4), 2, 0.7, (0.1, 0.5))
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        glob = [torch.randn(b, 3, 16, 16, generator=g, dtype=F64).requires_grad_() for _ in range(2)]
        local = [torch.randn(b, 3, 8, 8, generator=g, dtype=F64).requires_grad_() for _ in range(num_local)]
        sample_masks = gen(np.arange(step * b, (step + 1) * b), 0, b)["patches"]  # [B, 2, N]
        assert sample_masks.any()
        views = Views(glob, local, torch.arange(b), None, position=torch.arange(b))
        views.masks = {"patches": sample_masks}
        ours = method(views)["loss"]
        g_ours = torch.autograd.grad(ours, glob + local)

        flat = sample_masks.transpose(0, 1).reshape(2 * b, -1)  # the collate's crop-major rows
        ref = _official_step(official, torch.cat(glob), torch.cat(local), flat, num_local, dino, ibot)
        g_ref = torch.autograd.grad(ref, glob + local)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        for a, r in zip(g_ours, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-12)
    if centering == "centering":
        dino.apply_center_update()  # the official applies a step's update at the next call; ours right away
        ibot.apply_center_update()
        torch.testing.assert_close(method.center, dino.center.reshape(-1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(method.ibot_center, ibot.center.reshape(-1), rtol=1e-12, atol=1e-14)


def test_separate_ibot_head_trains_and_follows_by_ema() -> None:
    method = _tiny_method("sinkhorn_knopp", separate=True)
    b = 4
    views = Views([_randn(b, 3, 16, 16, seed=i) for i in range(2)], [], torch.arange(b), None)
    views.masks = BlockMasks((4, 4), 2, 1.0, (0.3, 0.5))(np.arange(b), 0, b)
    out = method(views)
    out["loss"].backward()
    assert method.ibot_head is not None and method.teacher_ibot_head is not None
    assert method.ibot_head.mlp[0].weight.grad.abs().sum() > 0
    before = method.teacher_ibot_head.mlp[0].weight.clone()
    with torch.no_grad():
        method.ibot_head.mlp[0].weight.add_(1.0)
    method.on_step_end(0, 10)
    assert not torch.equal(method.teacher_ibot_head.mlp[0].weight, before)
    assert set(out) >= {"loss", "dino", "ibot", "koleo", "teacher_entropy", "embeddings", "features"}


def test_lr_scales_are_the_official_layerwise_decay() -> None:
    method = _tiny_method("sinkhorn_knopp")
    scales = method.lr_scales()
    depth = len(method.backbone.blocks)
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        got = next((s for prefix, s in reversed(scales.items()) if name.startswith(prefix)), 1.0)
        if name.startswith("backbone.") or name == "mask_token":
            inner = name.removeprefix("backbone.").replace("reg_token", "register_tokens")  # the official's name
            want = _official_lr_decay_rate(inner, 0.9, num_layers=depth, force_is_backbone=True)
            want *= 0.2 if "patch_embed" in name else 1.0
        else:  # the heads: a submodel without blocks, rate^0
            want = _official_lr_decay_rate(name, 0.9, num_layers=0)
        assert got == pytest.approx(want, rel=1e-12), name


def test_teachers_stay_in_eval_mode() -> None:
    method = _tiny_method("sinkhorn_knopp").train()
    assert method.training and method.backbone.training
    assert not method.teacher_backbone.training and not method.teacher_head.training


def test_a_resnet_is_refused_with_a_clear_error() -> None:
    backbone, dim = build_backbone("resnet18")
    with pytest.raises(ValueError, match="model.backbone"):
        DINOv2(backbone, dim, C.DINOv2Config(out_dim=8), (4, 4))


# --- Through the real loop -----------------------------------------------------------------------------------------

OVERRIDES = {
    "method.name": "dinov2",
    "method.dinov2.out_dim": 32,
    "method.dinov2.hidden_dim": 32,
    "method.dinov2.bottleneck_dim": 16,
    "model.backbone": "vit_tiny",
    "model.patch_size": 4,
    "model.registers": 2,
    "augment.local_crops.count": 2,
    "augment.local_crops.size": 8,
    "data.workers": 1,
}


def test_dinov2_trains_logs_its_terms_and_resumes_exactly(shard_dir: Path, tmp_path: Path) -> None:
    whole = train(tiny_config(tmp_path / "a", str(shard_dir), steps=4, **OVERRIDES))
    records = read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "dino", "ibot", "koleo", "teacher_entropy"} <= r.keys(), r
        assert math.isfinite(r["loss"]), r
    cfg = tiny_config(tmp_path / "b", str(shard_dir), steps=4, **OVERRIDES)
    train(cfg, stop_after_steps=2)
    resumed = train(cfg)
    assert_same_params(final_params(whole), final_params(resumed))
