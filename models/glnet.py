"""GLNet: a global branch on the downsampled image and a local branch on full-resolution
patches, each a ResNet + FPN, exchanging feature maps both ways.

The modules hold weights only. Every forward takes the features it depends on as
arguments and returns the ones its caller may pass on, so nothing is cached between calls.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.backbone import ResNetBackbone
from models.fpn import FPN, Context, FPNOutput, Levels
from utils.layout import memory_format_of
from utils.patches import PatchGrid, coverage_on_map, crop_sampled, crop_to_patches, paste_patches, sampling_plan

BRANCH_GROUPS = ("resnet_global", "resnet_local", "fpn_global", "fpn_local", "ensemble_conv")


class BranchOutput(NamedTuple):
    """c: backbone maps (c2, c3, c4, c5); fpn: the head's logits and intermediates."""

    c: Levels
    fpn: FPNOutput

    @property
    def logits(self) -> Tensor:
        return self.fpn.logits

    @property
    def ps3(self) -> Tensor:
        return self.fpn.ps3

    def image(self, i: int) -> BranchOutput:
        """The outputs of the i-th image of the batch, keeping a batch dimension of one."""
        return BranchOutput(*(_map_tensors(part, lambda t: t[i : i + 1]) for part in self))  # type: ignore[arg-type]

    def context(self) -> Context:
        """The maps the other branch consumes."""
        return Context(self.c, self.fpn.ps0, self.fpn.ps1, self.fpn.ps2)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor of a nest of tuples and NamedTuples, keeping its structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    return type(obj)(*(_map_tensors(o, fn) for o in obj)) if hasattr(obj, "_fields") else type(obj)(
        _map_tensors(o, fn) for o in obj
    )


def _level_sizes(c: Levels) -> list[torch.Size]:
    # FPN levels p5..p2 have the spatial sizes of c5..c2.
    return [m.shape[-2:] for m in c[::-1]]


class _Crops(SequenceABC):
    """Whole-image maps (batch of one) cropped at patches and resized, each made when read.

    The local head reads each map once, so a crop lives only as long as the layer that
    consumes it, instead of all sixteen for the whole head. With `sampled`, for a compiled
    head, each crop is read by its sampling plan, made here, before the head runs: the
    head's graph then sees index and weight tensors of fixed shapes, not where the patches
    lie or how large their boxes are, which would specialise it on each pass and image size.
    """

    def __init__(
        self,
        maps: Sequence[Tensor],
        grid: PatchGrid,
        indices: Sequence[int],
        sizes: Sequence[Sequence[int]],
        sampled: bool = False,
    ) -> None:
        self.maps, self.grid, self.indices, self.sizes = maps, grid, indices, sizes
        self.plans = None
        if sampled:
            self.plans = [sampling_plan(grid, tuple(indices), tuple(m.shape[-2:]), tuple(int(n) for n in size), m.device)
                          for m, size in zip(maps, sizes)]

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, level: int) -> Tensor:  # type: ignore[override]
        if not isinstance(level, int):
            raise TypeError("crops are read one level at a time")
        if self.plans is not None:
            return crop_sampled(self.maps[level], self.plans[level])
        return crop_to_patches(self.maps[level], self.grid, self.indices, self.sizes[level])


def image_context(context: Context, i: int) -> Context:
    """The maps of the i-th image of a batch's context, keeping a batch dimension of one."""
    return _map_tensors(context, lambda t: t[i : i + 1])


def crop_context(g: Context, grid: PatchGrid, indices: Sequence[int], local_c: Levels, sampled: bool = False) -> Context:
    """The global maps g (batch of one image) cropped at each patch and resized to the local
    maps, each when read, by sampling plans with `sampled` (see _Crops)."""
    levels = _level_sizes(local_c)
    return Context(
        _Crops(g.c, grid, indices, [own.shape[-2:] for own in local_c], sampled),
        *(_Crops(maps, grid, indices, levels, sampled) for maps in g[1:]),
    )


class Canvases(NamedTuple):
    """Whole-image maps into which stage 3 adds the local features, zero at first.

    One buffer per map size (and dtype and layout, which in practice every map shares)
    holds every map of that size along its channels, so that a pass adds into all of them
    at once (four adds instead of sixteen; each map's values are the same, channel by
    channel). `context` is the same maps as views of the buffers.
    """

    buffers: tuple[Tensor, ...]
    members: tuple[tuple[tuple[int, int], ...], ...]  # per buffer, its maps' (field, level) in channel order
    context: Context


def empty_canvases(like: Context) -> Canvases:
    """Zero canvases shaped and laid out like one image's global maps, for merging local
    features (the global head later joins them with its own maps)."""
    groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for field, maps in enumerate(like):
        for level, m in enumerate(maps):
            groups.setdefault((*m.shape[-2:], m.dtype, memory_format_of(m)), []).append((field, level))
    views: list[list[Optional[Tensor]]] = [[None] * len(maps) for maps in like]
    buffers: list[Tensor] = []
    for (h, w, dtype, layout), members in groups.items():
        channels = [like[field][level].shape[1] for field, level in members]
        # torch.zeros takes no memory format.
        buffer = torch.empty((1, sum(channels), h, w), dtype=dtype, device=like[0][0].device,
                             memory_format=layout).zero_()
        start = 0
        for (field, level), n in zip(members, channels):
            views[field][level] = buffer[:, start : start + n]
            start += n
        buffers.append(buffer)
    return Canvases(tuple(buffers), tuple(tuple(m) for m in groups.values()),
                    Context(*(tuple(v) for v in views)))  # type: ignore[arg-type]


def paste_context(canvases: Canvases, local: Context, grid: PatchGrid, indices: Sequence[int]) -> None:
    """Add the local maps of the given patches into the whole-image canvases."""
    for buffer, members in zip(canvases.buffers, canvases.members):
        paste_patches(buffer, [local[field][level] for field, level in members], grid, indices)


def normalised_context(canvases: Canvases, grid: PatchGrid) -> Context:
    """The merged maps divided by the pixel coverage template resized to each map, as
    dense maps in their buffers' layout. An NCHW buffer is divided in place (its maps are
    dense slices of it, so no second copy is held); a channels-last buffer's maps are
    strided views, which the global head would resize by another path of torch's, with
    other rounding, so each is divided into a dense map of its own.

    Cells no crop reaches stay 0 (0 / coverage); this is the authors' normalisation.
    """
    maps = [list(field) for field in canvases.context]
    for buffer, members in zip(canvases.buffers, canvases.members):
        coverage = coverage_on_map(grid, buffer.shape[-2:], buffer.device).to(buffer.dtype)
        if memory_format_of(buffer) == torch.channels_last:
            for field, level in members:
                maps[field][level] = maps[field][level] / coverage
        else:
            buffer.div_(coverage)
    return Context(*(tuple(field) for field in maps))  # type: ignore[arg-type]


class _GlobalBranchMixin:
    resnet_global: ResNetBackbone
    fpn_global: FPN
    # Activation checkpointing: store only boundaries during the forward and recompute the
    # rest in backward (the backbones block by block, and the global FPN head, whose graph
    # stage 3 keeps across the backward passes of all its sub-batches).
    activation_checkpointing: bool = False

    def _checkpointing(self) -> bool:
        return self.activation_checkpointing and torch.is_grad_enabled()

    def _fpn(self, fpn: FPN, c: Levels, context: Optional[Context]) -> FPNOutput:
        if self._checkpointing():
            return checkpoint(fpn, c, context, use_reentrant=False)
        return fpn(c, context)

    def global_branch(self, images: Tensor, context: Optional[Context] = None) -> BranchOutput:
        """Global images (B, 3, Hg, Wg) -> logits at (Hg/4, Wg/4).

        context: merged local features (stage 3), which switch the head to its `_ext` layers.
        """
        c = self.resnet_global(images, self._checkpointing())
        return BranchOutput(c, self._fpn(self.fpn_global, c, context))


class GLNet(_GlobalBranchMixin, nn.Module):
    """The whole two-branch network. Attribute names and registration order give the
    authors' state-dict keys and order."""

    # A compiled local head (models/compiled.py) crops by sampling plans (see _Crops).
    sampled_crops: bool = False

    def __init__(self, n_class: int, backbone: str = "resnet50") -> None:
        super().__init__()
        if n_class < 2:
            raise ValueError(f"n_class must be at least 2, got {n_class}")
        self.n_class = n_class
        self.resnet_global = ResNetBackbone(backbone)
        self.resnet_local = ResNetBackbone(backbone)
        channels = self.resnet_global.channels
        self.fpn_global = FPN(n_class, channels, plain=True, context_suffix="_ext")
        self.fpn_local = FPN(n_class, channels, plain=False, context_suffix="")
        self.ensemble_conv = nn.Conv2d(2 * self.fpn_local.classify.in_channels, n_class, 3, padding=1)
        nn.init.normal_(self.ensemble_conv.weight, mean=0.0, std=0.01)

    def local_branch(self, patches: Tensor, context: Context, grid: PatchGrid, indices: Sequence[int]) -> BranchOutput:
        """Patches (n, 3, ph, pw) of one image, with that image's global maps (`context()`
        of its global branch, batch of one) as context, cropped at each patch."""
        c = self.local_features(patches)
        return BranchOutput(c, self.local_head(c, context, grid, indices))

    def local_features(self, patches: Tensor) -> Levels:
        """The local backbone: the only part of the local branch whose result depends on
        which patches share a batch (BatchNorm statistics in training)."""
        return self.resnet_local(patches, self._checkpointing())

    def local_head(self, c: Levels, context: Context, grid: PatchGrid, indices: Sequence[int]) -> FPNOutput:
        """The local FPN on backbone maps c of the patches `indices`, with the global context.

        Never checkpointed: it is trained only in stage 2, whose loss is backpropagated right
        after each (micro-)batch's head, so recomputation could not lower the peak.
        """
        return self.fpn_local(c, crop_context(context, grid, indices, c, self.sampled_crops))

    # ensemble_conv sees cat(local ps3, global ps3 crop). A convolution is linear in its
    # input channels, so it splits into a local term and a global term. Stage 3 evaluation
    # keeps the small local term (n_class channels) of every patch instead of its 512-channel
    # ps3 while it waits for the new global features.
    def ensemble_local_term(self, local_ps3: Tensor) -> Tensor:
        """The local half of ensemble_conv (no bias): (n, 512, h, w) -> (n, n_class, h, w)."""
        weight = self.ensemble_conv.weight[:, : local_ps3.shape[1]]
        return F.conv2d(local_ps3, weight, padding=self.ensemble_conv.padding)

    def ensemble(
        self, local_term: Tensor, global_ps3: Tensor, grid: PatchGrid, indices: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Ensemble logits per patch and the global ps3 crop they were computed from.

        local_term: `ensemble_local_term` of the patches' local ps3, (n, n_class, h, w);
        global_ps3: (1, 512, Hg/4, Wg/4) of the same image.
        """
        crop = crop_to_patches(global_ps3, grid, indices, local_term.shape[-2:])
        weight = self.ensemble_conv.weight[:, -crop.shape[1] :]
        conv = F.conv2d(crop, weight, self.ensemble_conv.bias, padding=self.ensemble_conv.padding)
        return local_term + conv, crop


class GlobalBranch(_GlobalBranchMixin, nn.Module):
    """The plain global half of GLNet under the same key names: the frozen stage-1 copy
    that gives the local branch its context in stage 3 (no `_ext` layers, no local half)."""

    def __init__(self, n_class: int, backbone: str = "resnet50") -> None:
        super().__init__()
        self.resnet_global = ResNetBackbone(backbone)
        self.fpn_global = FPN(n_class, self.resnet_global.channels, plain=True, context_suffix=None)

    def context_maps(self, images: Tensor) -> Context:
        """What stage 3 reads of this branch: `global_branch(images).context()`, the maps the
        local branch crops. The head on top (ps3 and logits, 33 MB in fp32 for a 508 x 508
        image) is never read, so it is not computed."""
        c = self.resnet_global(images, self._checkpointing())
        return Context(c, *self.fpn_global.pyramid(c))
