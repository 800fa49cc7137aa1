"""SimCLR (Chen et al., ICML 2020): NT-Xent over the other samples of the global batch as negatives.

Each rank computes the loss of its own rows against the columns of all ranks (gathered with autograd), so the
mean over ranks is the loss of the whole batch, at 1/W of the logits per rank.
"""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import Config, SimCLRConfig
from ssltrain.losses import dispatch
from ssltrain.methods.base import TwoViewMethod


class SimCLR(TwoViewMethod):
    row_split = True
    cfg: SimCLRConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.simclr

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        return dispatch.nt_xent(z_a, z_b, self.cfg.temperature, rows=rows, impl=self.loss_impl)
