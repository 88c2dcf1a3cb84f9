"""The FPN heads of GLNet, with the authors' layer names so their checkpoints load as is.

Both heads share one forward. Without context it is a plain FPN; with context (the other
branch's features, already resized to this head's maps) every convolution sees the channel
concatenation [own map, context map] and a final `smooth` conv fuses the doubled pyramid.
There are no activations or normalisations in these heads: every layer is a biased conv.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from utils.layout import memory_format_of
from utils.resample import resize

# Pyramid levels are always ordered top-down, (p5, p4, p3, p2), as in the authors' lists.
Levels = tuple[Tensor, Tensor, Tensor, Tensor]
FPN_CHANNELS = 256
HEAD_CHANNELS = 128
N_LEVELS = 4


class Context(NamedTuple):
    """Features of the other branch, each resized to the map it is concatenated with.

    c: (c2, c3, c4, c5) backbone maps; ps0, ps1, ps2: top-down levels (p5..p2) before
    smoothing, after `smoothK_1` and after `smoothK_2`. Each field is a sequence the head
    reads map by map, so a lazy one (the local head's crops of the global maps) makes each
    map only when its layer needs it.
    """

    c: Sequence[Tensor]
    ps0: Sequence[Tensor]
    ps1: Sequence[Tensor]
    ps2: Sequence[Tensor]


class FPNOutput(NamedTuple):
    """logits: (B, n_class, H/4, W/4); ps3: (B, 512, H/4, W/4), the input of `classify`."""

    logits: Tensor
    ps0: Levels
    ps1: Levels
    ps2: Levels
    ps3: Tensor


class _LayerSet(NamedTuple):
    top: nn.Conv2d
    lateral: tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]  # for c4, c3, c2
    smooth1: tuple[nn.Conv2d, ...]  # per level p5..p2
    smooth2: tuple[nn.Conv2d, ...]
    fuse: Optional[nn.Conv2d]  # only in sets that take context


def _context_map(context: Optional[Context], field: int, level: int) -> Optional[Tensor]:
    # Read at the moment of use: a lazy context map then lives only as long as the layer
    # that consumes it.
    return None if context is None else context[field][level]


def _join(x: Tensor, context: Optional[Tensor]) -> Tensor:
    return x if context is None else torch.cat((x, context), dim=1)


def _concat_resized(maps: Iterable[Tensor], channels: int, size: Sequence[int]) -> Tensor:
    """torch.cat of the maps, each resized to `size`, along channels (`channels` in all).

    Written map by map into the result, so besides it only one resized map exists at a
    time (a cat would hold every piece and the result together: at the local head's widest
    point, 2 x 1024 channels at 1/4 of the patch size). Every map of one head shares the
    first one's dtype and memory format, which the result takes.
    """
    out: Optional[Tensor] = None
    start = 0
    for m in maps:
        piece = resize(m, size)
        if out is None:
            out = torch.empty((piece.shape[0], channels, *piece.shape[-2:]), dtype=piece.dtype, device=piece.device,
                              memory_format=memory_format_of(piece))
        out[:, start : start + piece.shape[1]] = piece
        start += piece.shape[1]
    if out is None or start != channels:
        raise ValueError(f"expected maps with {channels} channels in all, got {start}")
    return out


class FPN(nn.Module):
    """FPN head.

    Args:
        n_class: number of output classes.
        in_channels: channels of (c2, c3, c4, c5).
        plain: build the plain layer set (no context); its layers have no suffix.
        context_suffix: build the layer set that takes context, named with this suffix
            (`"_ext"` in the global head, `""` in the local head); None for no such set.
    """

    def __init__(
        self,
        n_class: int,
        in_channels: tuple[int, int, int, int],
        plain: bool,
        context_suffix: Optional[str],
    ) -> None:
        super().__init__()
        if not plain and context_suffix is None:
            raise ValueError("an FPN needs at least one layer set")
        # Registration order reproduces the authors' state-dict order: the first set (with
        # its `smooth`), then `classify`, then the second set.
        sets = ([(1, "")] if plain else []) + ([(2, context_suffix)] if context_suffix is not None else [])
        self._sets: dict[bool, _LayerSet] = {}
        for i, (fold, suffix) in enumerate(sets):
            self._sets[fold == 2] = self._build_set(in_channels, fold, suffix)
            if i == 0:
                self.classify = nn.Conv2d(HEAD_CHANNELS * N_LEVELS, n_class, 3, padding=1)
        for conv in self.children():
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def _build_set(self, in_channels: tuple[int, ...], fold: int, suffix: str) -> _LayerSet:
        def add(name: str, conv: nn.Conv2d) -> nn.Conv2d:
            self.add_module(name + suffix, conv)
            return conv

        c2, c3, c4, c5 = (fold * ch for ch in in_channels)
        top = add("toplayer", nn.Conv2d(c5, FPN_CHANNELS, 1))
        lateral = tuple(add(f"latlayer{i}", nn.Conv2d(ch, FPN_CHANNELS, 1)) for i, ch in ((1, c4), (2, c3), (3, c2)))
        smooth1 = tuple(
            add(f"smooth{k}_1", nn.Conv2d(fold * FPN_CHANNELS, FPN_CHANNELS, 3, padding=1)) for k in range(1, 5)
        )
        smooth2 = tuple(
            add(f"smooth{k}_2", nn.Conv2d(fold * FPN_CHANNELS, HEAD_CHANNELS, 3, padding=1)) for k in range(1, 5)
        )
        fuse = None
        if fold == 2:
            # Named plain `smooth` in both heads, whatever the set's suffix.
            fuse = nn.Conv2d(2 * HEAD_CHANNELS * N_LEVELS, HEAD_CHANNELS * N_LEVELS, 3, padding=1)
            self.smooth = fuse
        return _LayerSet(top, lateral, smooth1, smooth2, fuse)  # type: ignore[arg-type]

    def pyramid(self, c: Levels, context: Optional[Context] = None) -> tuple[Levels, Levels, Levels]:
        """ps0, ps1, ps2 alone: what the other branch reads, without the head on top."""
        return self._pyramid(self._layers(context), c, context)

    def forward(self, c: Levels, context: Optional[Context] = None) -> FPNOutput:
        """c: (c2, c3, c4, c5) of this branch; context: the other branch's maps or None."""
        layers = self._layers(context)
        ps0, ps1, ps2 = self._pyramid(layers, c, context)
        # Context maps have the channels of the own maps they join.
        folds = 1 if context is None else 2
        pieces = (m for i, p in enumerate(ps2) for m in (p, _context_map(context, 3, i)) if m is not None)
        ps3 = _concat_resized(pieces, folds * sum(p.shape[1] for p in ps2), ps2[-1].shape[-2:])
        if layers.fuse is not None:
            ps3 = layers.fuse(ps3)
        return FPNOutput(self.classify(ps3), ps0, ps1, ps2, ps3)

    def _layers(self, context: Optional[Context]) -> _LayerSet:
        layers = self._sets.get(context is not None)
        if layers is None:
            raise ValueError(f"this FPN {'needs' if context is None else 'takes no'} context features")
        return layers

    @staticmethod
    def _pyramid(layers: _LayerSet, c: Levels, context: Optional[Context]) -> tuple[Levels, Levels, Levels]:
        p = layers.top(_join(c[3], _context_map(context, 0, 3)))
        ps0 = [p]
        for lateral, level in zip(layers.lateral, (2, 1, 0)):
            lat = lateral(_join(c[level], _context_map(context, 0, level)))
            p = resize(p, lat.shape[-2:]) + lat
            ps0.append(p)
        ps1 = [conv(_join(p, _context_map(context, 1, i))) for i, (conv, p) in enumerate(zip(layers.smooth1, ps0))]
        ps2 = [conv(_join(p, _context_map(context, 2, i))) for i, (conv, p) in enumerate(zip(layers.smooth2, ps1))]
        return tuple(ps0), tuple(ps1), tuple(ps2)  # type: ignore[return-value]
