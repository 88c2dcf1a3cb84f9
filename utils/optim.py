"""Adam as the authors' torch (0.4.1, docs/authors_behaviour.md) stepped it.

torch 0.4.1 added eps to sqrt(v) and folded the second moment's bias correction into the step
size: p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps). torch 2's Adam adds eps
after the correction: p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), so its
eps acts 1 / sqrt(1 - beta2^t) times smaller: 32 times at the first step, 3.2 times at the
hundredth, 1.26 times at the thousandth. Where gradients are small (weight decay alone gives
5e-4 * |w|), early steps differ by percents. Giving torch 2's Adam eps / sqrt(1 - beta2^t) at
step t makes the two updates equal up to float rounding, and keeps torch's own (foreach)
kernels and its state layout: resume files hold torch.optim.Adam's state.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch


class Adam041(torch.optim.Adam):
    """torch.optim.Adam with torch 0.4.1's update (module docstring); weight decay is added
    to the gradient, as both versions do. eps is the optimizer's, for every group. Every
    parameter of a group that has a gradient must have taken the same number of steps, as
    in training, where a parameter learns in every batch of a stage or in none."""

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:  # first: it may set the gradients that say which parameters step
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            steps = {int(self.state[p]["step"]) if "step" in self.state[p] else 0
                     for p in group["params"] if p.grad is not None}
            if len(steps) > 1:
                raise RuntimeError(f"parameters of group {group.get('name', '?')} have taken different numbers "
                                   f"of steps ({sorted(steps)}); torch 0.4.1's eps needs one count per group")
            if steps:
                t = steps.pop() + 1
                group["eps"] = self.defaults["eps"] / math.sqrt(1.0 - group["betas"][1] ** t)
        super().step()
        return loss
