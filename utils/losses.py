"""Training losses of GLNet."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

FOCAL_GAMMA = 3.0
PROB_EPS = 1e-7


def focal_loss(logits: Tensor, target: Tensor, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Mean over pixels of -(1 - p)^gamma * log p, p the clamped softmax probability of the
    target class. logits: (B, K, h, w); target: (B, h, w) integer class ids."""
    p = F.softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).clamp(PROB_EPS, 1.0 - PROB_EPS)
    return (-((1.0 - p) ** gamma) * p.log()).mean()


def fmreg_loss(local_ps3: Tensor, global_ps3_crop: Tensor) -> Tensor:
    """Feature-map regularisation: MSE between the local ps3 and the matching global crop."""
    return F.mse_loss(local_ps3, global_ps3_crop)
