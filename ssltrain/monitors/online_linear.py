"""The online linear probe: a linear classifier on detached backbone features, trained alongside pretraining.

Its accuracy is an *online* figure: measured on augmented training batches while the backbone moves, it runs below
the offline probe of ``ssltrain eval`` (frozen backbone, unaugmented images, a tuned probe), and is logged as
``online_linear_top1`` so the two are never confused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssltrain.core.collectives import all_reduce_mean_no_grad


class OnlineLinearProbe(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"label {int(labels.max())} is outside the online probe's {self.num_classes} classes; "
                             "set eval.online_linear_classes to the number of classes")
        logits = self.linear(features.detach().float())
        loss = F.cross_entropy(logits, labels)
        top1 = all_reduce_mean_no_grad((logits.argmax(1) == labels).float().mean())
        return {"online_linear_loss": loss, "online_linear_top1": top1}
