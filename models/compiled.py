"""torch.compile (inductor) of GLNet's networks for inference (`--compile`).

Each backbone and each FPN head is compiled as a whole, in place (`nn.Module.compile`, so
the state-dict keys keep their names). Everything between them stays eager: cutting the
patches, cropping the global maps at them, pasting the local maps into the whole-image
canvases and the ensemble. Those depend on which patches a pass holds, and a compiled
graph would be specialised on each pass's positions. Shapes then depend only on size_g,
size_p and the patches in a pass: a folder of images of one size compiles once. A pass
with another number of patches adds a graph whose batch dimension is dynamic (torch's
automatic dynamic shapes), which every later count shares, except a pass of one patch
(sizes of 1 are always specialised): at most three graphs per local network, well within
torch's limit of eight per function (past it a function runs eager). The frozen stage-1
branch's head (`GlobalBranch.context_maps`) runs once per image and stays eager.
"""
from __future__ import annotations

from typing import Optional

from models.glnet import GLNet, GlobalBranch


def compile_for_inference(model: GLNet, frozen_global: Optional[GlobalBranch] = None) -> None:
    """Compile the backbones and FPN heads of networks that only predict, in place.

    The local head then takes every crop of the global maps made before it runs, instead
    of one at a time (GLNet.lazy_crops): at size_p 508 that holds about 22 M values per
    patch at once (43 MB in bf16) while the head runs."""
    model.lazy_crops = False
    nets = [model.resnet_global, model.resnet_local, model.fpn_global, model.fpn_local]
    if frozen_global is not None:
        nets.append(frozen_global.resnet_global)
    for net in nets:
        net.compile()
