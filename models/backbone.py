"""ResNet backbones (v1.5, torchvision's layout) cut after layer4: image -> (c2, c3, c4, c5).

Written here rather than imported from torchvision because importing torchvision costs
about 170 MB of resident memory (its package import pulls in far more than ResNet), a
twelfth of the CPU evaluation budget. Parameter names and registration order are
torchvision's, so ImageNet weights and the authors' checkpoints load without renaming;
tests/test_model.py checks equal outputs against torchvision's own ResNets.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Features = tuple[Tensor, Tensor, Tensor, Tensor]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """v1.5: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


_LAYOUTS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    # Small variant so tests can build whole networks in milliseconds.
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
}
BACKBONES = tuple(_LAYOUTS)  # GLNet's first


class ResNetBackbone(nn.Module):
    """ResNet without avgpool/fc, initialised as torchvision initialises it."""

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        if arch not in _LAYOUTS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(_LAYOUTS)}")
        block, depths = _LAYOUTS[arch]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for i, depth in enumerate(depths):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            out_channels = planes * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
                )
            blocks = [block(in_channels, planes, stride, downsample)]
            blocks += [block(out_channels, planes, 1, None) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = out_channels
        self.channels: tuple[int, int, int, int] = tuple(  # type: ignore[assignment]
            64 * block.expansion * 2**i for i in range(4)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, checkpoint_layers: bool = False) -> Features:
        """(B, 3, H, W) -> c2..c5 at strides 4, 8, 16, 32.

        checkpoint_layers: activation checkpointing, which bounds training memory. Backward
        keeps only the stem's and each stage's output and recomputes a stage when it gets
        there; within that recomputation each block is checkpointed again, so only one
        block's activations are ever materialised at a time.
        """
        if not checkpoint_layers:
            x = self._stem(x)
            features = []
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
                features.append(x)
            return tuple(features)  # type: ignore[return-value]
        x = _checkpointed(self._stem, self.bn1, x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _checkpointed(partial(_blocks_checkpointed, layer), layer, x)
            features.append(x)
        return tuple(features)  # type: ignore[return-value]

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def fold_batchnorm(backbone: ResNetBackbone) -> None:
    """Fold every BatchNorm (running statistics) into the convolution it follows, in place,
    for a backbone that only predicts: one convolution with a bias instead of a convolution
    and a normalisation, so one kernel fewer per pair (on a GPU, one launch and one pass
    over the activation).

    The folded network computes the same function, but its fp32 results differ in the last
    bits, so it is for inference under autocast, which rounds far more than that. A folded
    backbone cannot be trained or saved under the authors' keys.
    """
    for owner, conv_name, norm_name in _conv_norm_pairs(backbone):
        conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
        if not isinstance(norm, nn.BatchNorm2d):
            raise ValueError("this backbone's BatchNorm is already folded")
        with torch.no_grad():
            # In float64, so each folded weight is the correctly rounded product.
            scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
            weight = conv.weight.double() * scale[:, None, None, None]
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            bias = norm.bias.double() - norm.running_mean.double() * scale
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        setattr(owner, norm_name, nn.Identity())


def _conv_norm_pairs(backbone: ResNetBackbone) -> Iterator[tuple[nn.Module, str, str]]:
    """(module, convolution name, BatchNorm name) of every convolution a BatchNorm follows."""
    yield backbone, "conv1", "bn1"
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            for i in (1, 2, 3) if isinstance(block, Bottleneck) else (1, 2):
                yield block, f"conv{i}", f"bn{i}"
            if block.downsample is not None:
                yield block.downsample, "0", "1"


def _checkpointed(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> Tensor:
    """fn(x) under activation checkpointing; module holds the BatchNorms fn runs."""
    return checkpoint(fn, x, use_reentrant=False, context_fn=lambda: (
        contextlib.nullcontext(), _BatchNormStatisticsFrozen(module)))


def _blocks_checkpointed(layer: nn.Sequential, x: Tensor) -> Tensor:
    for block in layer:
        x = _checkpointed(block, block, x)
    return x


class _BatchNormStatisticsFrozen:
    """While a checkpointed part is recomputed for backward, its BatchNorm layers must
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
