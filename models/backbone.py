"""ResNet backbones cut after layer4: image -> (c2, c3, c4, c5)."""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

Features = tuple[Tensor, Tensor, Tensor, Tensor]

_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    # Small variant so tests can build whole networks in milliseconds.
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
}


class ResNetBackbone(ResNet):
    """torchvision's ResNet (v1.5) without avgpool/fc.

    Parameter names are torchvision's, so ImageNet weights and the authors' checkpoints
    (which used the same layout) load without renaming.
    """

    def __init__(self, arch: str = "resnet50") -> None:
        if arch not in _LAYOUTS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(_LAYOUTS)}")
        block, layers = _LAYOUTS[arch]
        super().__init__(block, layers)
        del self.avgpool, self.fc
        self.channels: tuple[int, int, int, int] = tuple(  # type: ignore[assignment]
            64 * block.expansion * 2**i for i in range(4)
        )

    def forward(self, x: Tensor, checkpoint_layers: bool = False) -> Features:  # type: ignore[override]
        """(B, 3, H, W) -> c2..c5 at strides 4, 8, 16, 32.

        checkpoint_layers: keep only each stage's output for backward and recompute the
        stage's inside then (activation checkpointing), which bounds training memory.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if checkpoint_layers:
                x = checkpoint(layer, x, use_reentrant=False, context_fn=lambda l=layer: (
                    contextlib.nullcontext(), _BatchNormStatisticsFrozen(l)))
            else:
                x = layer(x)
            features.append(x)
        return tuple(features)  # type: ignore[return-value]


class _BatchNormStatisticsFrozen:
    """While a checkpointed stage is recomputed for backward, its BatchNorm layers must
    normalise exactly as in the forward (batch statistics in train mode) but must not
    update their running statistics a second time: momentum 0 keeps them as they are.
    Re-enterable, because stage 3 backpropagates through the global branch repeatedly."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        self.saved: list[tuple[Optional[float], Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
