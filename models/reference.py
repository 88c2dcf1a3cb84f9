"""GLNet as the paper and the authors' code define it, in plain PyTorch: the reference.

Read this file to see the method; `docs/authors_behaviour.md` (sections 1-3) describes the same
in words. Training, evaluation and prediction run the memory-lean engine (`models/glnet.py`,
`models/fpn.py`, `models/stages.py`), which tests/test_engine.py holds equal to this file in
logits, losses and gradients, and tests/test_parity.py holds this file equal to the arrays the
authors' code produced. Names and registration order give the authors' state-dict keys, so the
same weights load into both.

Shapes: an image (3, H, W) in [0, 1]; its global image (1, 3, Hg, Wg); N patches
(N, 3, ph, pw). c2..c5 have strides 4..32; p5..p2 are the FPN levels of c5..c2.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from utils.patches import PatchGrid

LAMB_FMREG = 0.15
GROUPS = {  # the parameter groups a mode trains (BatchNorm in train mode); the rest are frozen
    1: ("resnet_global", "fpn_global", "ensemble_conv"),
    2: ("resnet_local", "fpn_local", "ensemble_conv"),
    3: ("resnet_global", "fpn_global", "ensemble_conv"),
}
Head = tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor]  # an FPN's logits, ps0, ps1, ps2, ps3
Branch = tuple[tuple[Tensor, ...], Head]  # a branch's c2..c5 and its FPN's outputs


def up(x: Tensor, size: Sequence[int]) -> Tensor:
    """The paper's "upsample": bilinear, align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def cat(x: Tensor, ext: Optional[Tensor]) -> Tensor:
    return x if ext is None else torch.cat([x, ext], dim=1)


class ResNet(nn.Module):
    """torchvision's ResNet without avgpool and fc: image -> (c2, c3, c4, c5)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)()
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, part, getattr(net, part))
        # Output channels of layer1..layer4 (c2..c5): what each stage's last block takes in
        # is what the stage puts out; fc takes layer4's.
        self.channels = tuple(layer[-1].conv1.in_channels for layer in (net.layer1, net.layer2, net.layer3)) + (
            net.fc.in_features,)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c2 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))  # (B, 256, H/4, W/4) for ResNet-50
        c3 = self.layer2(c2)  # (B, 512, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 1024, H/16, W/16)
        return c2, c3, c4, self.layer4(c4)  # c5: (B, 2048, H/32, W/32)


class FPN(nn.Module):
    """An FPN head of biased convolutions only. Its `ext` set of layers takes the other
    branch's maps: every convolution sees cat(own map, other branch's map), and `smooth` fuses
    the doubled pyramid. The global head has a plain set ("") and an ext set ("_ext"); the
    local head only an ext set, named "". The first set, then `classify`, then the second."""

    def __init__(self, n_class: int, channels: tuple[int, ...], plain: bool, ext_suffix: str) -> None:
        super().__init__()
        self.ext_suffix = ext_suffix
        sets = ([(1, "")] if plain else []) + [(2, ext_suffix)]
        for i, (fold, s) in enumerate(sets):
            c2, c3, c4, c5 = (fold * ch for ch in channels)
            self.add_module("toplayer" + s, nn.Conv2d(c5, 256, 1))
            for k, ch in ((1, c4), (2, c3), (3, c2)):
                self.add_module(f"latlayer{k}{s}", nn.Conv2d(ch, 256, 1))
            for k in range(1, 5):
                self.add_module(f"smooth{k}_1{s}", nn.Conv2d(fold * 256, 256, 3, padding=1))
            for k in range(1, 5):
                self.add_module(f"smooth{k}_2{s}", nn.Conv2d(fold * 256, 128, 3, padding=1))
            if fold == 2:
                self.smooth = nn.Conv2d(1024, 512, 3, padding=1)
            if i == 0:
                self.classify = nn.Conv2d(512, n_class, 3, padding=1)
        for conv in self.children():
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, c: tuple[Tensor, ...], ext: Optional[Sequence[list[Tensor]]] = None) -> Head:
        """c: (c2, c3, c4, c5); ext: the other branch's (c2..c5, ps0, ps1, ps2), each map resized
        to the one it joins. Returns logits (B, n_class, H/4, W/4), ps0, ps1, ps2 (p5..p2 after
        each step) and ps3 (B, 512, H/4, W/4), the input of `classify`."""
        s = "" if ext is None else self.ext_suffix
        layer = lambda name: getattr(self, name + s)  # noqa: E731
        e = (lambda field, i: None) if ext is None else (lambda field, i: ext[field][i])  # noqa: E731
        c2, c3, c4, c5 = c
        p5 = layer("toplayer")(cat(c5, e(0, 3)))
        p4 = up(p5, c4.shape[-2:]) + layer("latlayer1")(cat(c4, e(0, 2)))
        p3 = up(p4, c3.shape[-2:]) + layer("latlayer2")(cat(c3, e(0, 1)))
        p2 = up(p3, c2.shape[-2:]) + layer("latlayer3")(cat(c2, e(0, 0)))
        ps0 = [p5, p4, p3, p2]
        ps1 = [layer(f"smooth{i + 1}_1")(cat(p, e(1, i))) for i, p in enumerate(ps0)]  # 256 channels
        ps2 = [layer(f"smooth{i + 1}_2")(cat(p, e(2, i))) for i, p in enumerate(ps1)]  # 128 channels
        ps3 = torch.cat([up(cat(p, e(3, i)), p2.shape[-2:]) for i, p in enumerate(ps2)], dim=1)
        if ext is not None:
            ps3 = self.smooth(ps3)  # 1024 -> 512 channels
        return self.classify(ps3), ps0, ps1, ps2, ps3


class GLNet(nn.Module):
    def __init__(self, n_class: int, backbone: str = "resnet50") -> None:
        super().__init__()
        self.resnet_global, self.resnet_local = ResNet(backbone), ResNet(backbone)
        channels = self.resnet_global.channels
        self.fpn_global = FPN(n_class, channels, plain=True, ext_suffix="_ext")
        self.fpn_local = FPN(n_class, channels, plain=False, ext_suffix="")
        self.ensemble_conv = nn.Conv2d(1024, n_class, 3, padding=1)
        nn.init.normal_(self.ensemble_conv.weight, 0.0, 0.01)

    def global_branch(self, image_g: Tensor, ext: Optional[Sequence[list[Tensor]]] = None) -> Branch:
        """(c2..c5, (logits, ps0, ps1, ps2, ps3)) of the global image; ext: merged local maps."""
        c = self.resnet_global(image_g)
        return c, self.fpn_global(c, ext)

    def local_branch(self, patches: Tensor, glob: Branch, grid: PatchGrid, idx: range) -> Branch:
        """The local branch on patches idx with the global maps of their image, cropped at
        each patch and upsampled to the local map they join."""
        c = self.resnet_local(patches)  # c2..c5 of the N patches
        (gc, (_, g0, g1, g2, _)), sizes = glob, [m.shape[-2:] for m in c]  # global maps: batch of one
        # Crops of the global c2..c5 sized like the local c2..c5, of ps0..ps2 like p5..p2.
        ext = ([crops(m, grid, idx, s) for m, s in zip(gc, sizes)],
               *([crops(m, grid, idx, s) for m, s in zip(maps, sizes[::-1])] for maps in (g0, g1, g2)))
        return c, self.fpn_local(c, ext)

    def ensemble(self, local_ps3: Tensor, global_ps3: Tensor, grid: PatchGrid, idx: range) -> tuple[Tensor, Tensor]:
        """Ensemble logits (N, n_class, ph/4, pw/4) of patches idx from their ps3 (N, 512, ph/4,
        pw/4) and the global ps3 (1, 512, Hg/4, Wg/4); and the crop of the global ps3 they saw."""
        crop = crops(global_ps3, grid, idx, local_ps3.shape[-2:])
        return self.ensemble_conv(torch.cat([local_ps3, crop], dim=1)), crop


def crops(fmap: Tensor, grid: PatchGrid, idx: range, size: Sequence[int]) -> Tensor:
    """A whole-image map (1, C, Hf, Wf) cut at each patch's box and upsampled: (N, C, *size)."""
    boxes = [grid.cell_box(i, fmap.shape[-2:]) for i in idx]
    return torch.cat([up(fmap[:, :, t : t + h, l : l + w], size) for t, l, h, w in boxes])


def merge(patch_maps: list[Tensor], grid: PatchGrid, size: Sequence[int]) -> Tensor:
    """Every patch's map upsampled to its box on a (1, C, *size) map and added there, then
    divided by the patch coverage of the full-resolution image upsampled to `size`."""
    canvas = patch_maps[0].new_zeros((1, patch_maps[0].shape[1], *size))
    for i, m in enumerate(torch.cat(patch_maps)):
        t, l, h, w = grid.cell_box(i, size)
        canvas[:, :, t : t + h, l : l + w] += up(m[None], (h, w))
    return canvas / up(grid.coverage()[None, None].to(canvas), size)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 3.0) -> Tensor:
    p = F.softmax(logits, dim=1).gather(1, target[:, None].long()).clamp(1e-7, 1 - 1e-7)
    return (-((1 - p) ** gamma) * p.log()).mean()


def set_modes(model: GLNet, mode: int, training: bool) -> None:
    for name, module in model.named_children():
        module.train(training and name in GROUPS[mode])


def run(model: GLNet, mode: int, image: Tensor, image_g: Tensor, grid: PatchGrid, sub_batch: int,
        frozen: Optional[GLNet] = None, targets: Optional[tuple[Tensor, Tensor]] = None,
        backward: bool = False) -> dict[str, list]:
    """One image through `mode`, as the authors' training and evaluation steps do.

    targets: (global target (1, Hg/4, Wg/4), patch targets (N, ph/4, pw/4)) or None;
    frozen: the stage-1 network whose global branch gives mode 3 its context. With backward,
    each loss is backpropagated where the authors do (gradients accumulate, no step).
    Returns lists: global/local/ensemble logits, focal values in call order (criteria),
    backpropagated losses (totals) and fmreg per sub-batch.
    """
    out = {k: [] for k in ("global", "local", "ensemble", "criteria", "totals", "fmreg")}

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        value = focal_loss(logits, target)
        out["criteria"].append(value.item())
        return value

    def step(total: Tensor, retain_graph: bool = False) -> None:
        out["totals"].append(total.item())
        if backward:
            total.backward(retain_graph=retain_graph)

    batches = [range(i, min(i + sub_batch, len(grid))) for i in range(0, len(grid), sub_batch)]
    patches = lambda idx: torch.stack([image[:, t : t + grid.patch_size[0], l : l + grid.patch_size[1]]  # noqa: E731
                                       for t, l in map(grid.origin, idx)])
    if mode == 1:  # the global branch alone
        _, (logits, *_) = model.global_branch(image_g)
        out["global"].append(logits)
        if targets is not None:
            step(loss(logits, targets[0]))
    elif mode == 2:  # the local branch learns, with the global branch's maps as context
        with torch.no_grad():
            glob = model.global_branch(image_g)
        out["global"].append(glob[1][0])
        for idx in batches:
            _, (logits, _, _, _, ps3) = model.local_branch(patches(idx), glob, grid, idx)
            ensemble, crop = model.ensemble(ps3, glob[1][4], grid, idx)
            fmreg = F.mse_loss(ps3, crop)  # feature-map regularisation
            out["local"].append(logits)
            out["ensemble"].append(ensemble)
            out["fmreg"].append(fmreg.item())
            if targets is not None:
                target = targets[1][idx.start : idx.stop]
                step(loss(logits, target) + loss(ensemble, target) + LAMB_FMREG * fmreg)
    else:  # mode 3: local maps (with the frozen stage-1 context) merged into the global branch
        with torch.no_grad():
            fixed = frozen.global_branch(image_g)
            local = [model.local_branch(patches(idx), fixed, grid, idx) for idx in batches]
            levels = [(*c, *ps0, *ps1, *ps2) for c, (_, ps0, ps1, ps2, _) in local]
            sizes = [m.shape[-2:] for m in (*fixed[0], *fixed[1][1], *fixed[1][2], *fixed[1][3])]
            merged = [merge(list(maps), grid, s) for maps, s in zip(zip(*levels), sizes)]
        _, (logits, _, _, _, global_ps3) = model.global_branch(image_g, [merged[4 * k : 4 * k + 4] for k in range(4)])
        out["global"].append(logits)
        if targets is not None:
            step(loss(logits, targets[0]), retain_graph=True)
        for j, (idx, (_, (local_logits, *_, ps3))) in enumerate(zip(batches, local)):
            ensemble, _ = model.ensemble(ps3, global_ps3, grid, idx)
            out["local"].append(local_logits)
            out["ensemble"].append(ensemble)
            if targets is not None:
                step(loss(ensemble, targets[1][idx.start : idx.stop]), retain_graph=j < len(batches) - 1)
    return out
