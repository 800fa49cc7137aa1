"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views' standardised embeddings
pushed to the identity. The correlation is over the batch gathered from all ranks (the official code all-reduces
it), so the loss equals the single-process loss on that batch; fused kernel on GPU."""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import BarlowTwinsConfig, Config
from ssltrain.losses import dispatch
from ssltrain.methods.base import TwoViewMethod


class BarlowTwins(TwoViewMethod):
    cfg: BarlowTwinsConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.barlow_twins

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        return dispatch.barlow_twins(z_a, z_b, self.cfg.lambd, impl=self.loss_impl)
