"""Focal loss (gamma 3, clamped probability) and the feature-map regulariser (utils/losses.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from utils.losses import PROB_EPS, fmreg_loss, focal_loss


def _focal_numpy(logits: np.ndarray, target: np.ndarray, gamma: float) -> float:
    """The authors' focal loss (docs/authors_behaviour.md, section 3) in float64 NumPy: mean
    over pixels of -(1 - p)^gamma * log p."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    p = np.take_along_axis(prob, target[:, None].astype(np.int64), axis=1)[:, 0]
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(np.mean(-((1 - p) ** gamma) * np.log(p)))


def _pixel(logit_of_target: float, n_class: int = 7) -> torch.Tensor:
    """One pixel whose target class 0 has the given logit and the others 0."""
    logits = torch.zeros(1, n_class, 1, 1)
    logits[0, 0] = logit_of_target
    return logits


TARGET0 = torch.zeros(1, 1, 1, dtype=torch.long)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_focal_loss_equals_the_formula(device, scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(3, 7, 9, 11, generator=g) * scale
    target = torch.randint(0, 7, (3, 9, 11), generator=g)
    expected = _focal_numpy(logits.numpy(), target.numpy(), 3.0)
    got = focal_loss(logits.to(device), target.to(device))
    assert got.shape == () and got.device.type == device
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # Targets may arrive as uint8 label maps.
    assert focal_loss(logits, target.to(torch.uint8)).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(2, 5, 6, 6)
    target = torch.randint(0, 5, (2, 6, 6))
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))


def test_focal_loss_orderings():
    confident_right = focal_loss(_pixel(10.0), TARGET0)
    uncertain = focal_loss(_pixel(0.0), TARGET0)
    confident_wrong = focal_loss(_pixel(-10.0), TARGET0)
    assert 0 < confident_right < uncertain < confident_wrong
    # Down-weighting of easy pixels: relative to cross-entropy, the focal term shrinks
    # an easy pixel far more than a hard one.
    ce = lambda logits: F.cross_entropy(logits, TARGET0)  # noqa: E731
    assert confident_right / ce(_pixel(10.0)) < 1e-9
    assert confident_wrong / ce(_pixel(-10.0)) > 0.99
    # Monotone in the target's logit.
    values = [focal_loss(_pixel(z), TARGET0).item() for z in np.linspace(-8, 8, 17)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_focal_loss_is_finite_for_extreme_logits():
    wrong = _pixel(-1e4)
    right = _pixel(1e4)
    # The clamp bounds the loss at -(1 - eps)^3 log(eps) and keeps it positive.
    bound = -((1 - PROB_EPS) ** 3) * math.log(PROB_EPS)
    assert focal_loss(wrong, TARGET0).item() == pytest.approx(bound, rel=1e-5)
    assert 0 <= focal_loss(right, TARGET0).item() < 1e-12
    logits = torch.tensor([[[[1e30]], [[-1e30]], [[0.0]]]], requires_grad=True)
    for target in range(3):
        loss = focal_loss(logits, torch.full((1, 1, 1), target))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        logits.grad = None


def test_fmreg_is_the_mean_squared_difference():
    a, b = torch.randn(4, 512, 6, 6), torch.randn(4, 512, 6, 6)
    expected = ((a.double() - b.double()) ** 2).mean().item()
    assert fmreg_loss(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert fmreg_loss(a, b).item() == pytest.approx(fmreg_loss(b, a).item(), rel=1e-6)
    assert fmreg_loss(a, a).item() == 0
    assert fmreg_loss(a, a + 2).item() == pytest.approx(4.0, rel=1e-6)
