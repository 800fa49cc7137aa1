"""BYOL's regression loss between the online prediction and the teacher projection."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_same, compute_dtype


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss (Grill et al., NeurIPS 2020): ``1/N * sum_i (2 - 2 cos(p_i, z_i))``.

    ``p`` is the online predictor output, ``z`` the target projection, both (N, D); this equals the mean
    squared distance between the L2-normalised rows. Nothing is detached here: the caller passes an
    EMA-teacher (or otherwise stop-gradient) ``z``. N = 1 is allowed.
    """
    check_same(1, p=p, z=z)
    dtype = compute_dtype(p, z)
    p_n = F.normalize(p.to(dtype), dim=1)
    z_n = F.normalize(z.to(dtype), dim=1)
    return (2 - 2 * (p_n * z_n).sum(dim=1)).mean()
