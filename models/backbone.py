"""ResNet backbones cut after layer4: image -> (c2, c3, c4, c5)."""
from __future__ import annotations

from torch import Tensor, nn
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

    def forward(self, x: Tensor) -> Features:  # type: ignore[override]
        """(B, 3, H, W) -> c2..c5 at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5
