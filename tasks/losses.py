"""Losses our experiment files use that mmseg 1.2.2 does not provide in a usable form.

`SoftmaxFocalLoss` (the study's open idea "Focal loss", configs/h1_focal_*.py): the multi-class focal
loss of Lin et al. 2017 on softmax probabilities, FL = -w_t (1 - p_t)^gamma log p_t, averaged over the
non-ignored pixels. mmseg's own FocalLoss is sigmoid-only (it asserts use_sigmoid=True, one binary
problem per class, not the softmax the study's 3-class heads use); its GPU path calls mmcv.ops'
compiled sigmoid_focal_loss, and its pure-torch CPU path one-hot encodes the target and then keeps only
column `num_classes` (`target[:, num_classes]`), so CPU and GPU trainings would optimise different
losses. This one is plain torch, the same on every device, and with gamma=0 it equals CrossEntropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import nn


@MODELS.register_module()
class SoftmaxFocalLoss(nn.Module):
    """Softmax focal loss for (N, C, H, W) logits and (N, H, W) labels, `ignore_index` left out."""

    def __init__(
        self,
        gamma: float = 2.0,
        class_weight: list[float] | None = None,
        loss_weight: float = 1.0,
        ignore_index: int = 255,
        loss_name: str = "loss_focal",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"SoftmaxFocalLoss: gamma must be >= 0 (got {gamma})")
        self.gamma, self.class_weight, self.loss_weight = float(gamma), class_weight, float(loss_weight)
        self.ignore_index, self._loss_name = ignore_index, loss_name

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        ignore = self.ignore_index if ignore_index is None else ignore_index
        valid = target != ignore
        labels = torch.where(valid, target, torch.zeros_like(target)).long()
        log_pt = F.log_softmax(pred.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
        loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        if self.class_weight is not None:
            loss = loss * pred.new_tensor(self.class_weight).float()[labels]
        if weight is not None:  # mmseg's per-pixel seg_weight (None for every study head)
            loss = loss * weight
        loss = loss * valid
        return self.loss_weight * loss.sum() / valid.sum().clamp(min=1)

    @property
    def loss_name(self) -> str:
        return self._loss_name
