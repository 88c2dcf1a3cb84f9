"""torch.compile (inductor) of GLNet's networks for inference (`--compile`).

Each backbone and each FPN head is compiled as a whole, in place (`nn.Module.compile`, so
the state-dict keys keep their names). Everything between them stays eager: cutting the
patches, pasting the local maps into the whole-image canvases and the ensemble. Those
depend on which patches a pass holds, and a compiled graph would be specialised on each
pass's positions. The local head crops the global maps itself, each when it reads it, by
sampling plans made before it runs (models/glnet._Crops), whose shapes do not depend on
where the patches lie or on the image's size.

Graphs are static, planned for their exact shapes, which then depend only on size_g, size_p,
the images in a batch and the patches in a pass: a folder of images of one size compiles
once, and each other pass size met (an image's last pass) or batch size (an evaluation's
last batch) once more.
"""
from __future__ import annotations

from typing import Optional

import torch

from models.glnet import GLNet, GlobalBranch


def compile_for_inference(model: GLNet, frozen_global: Optional[GlobalBranch] = None, largest_pass: int = 1) -> None:
    """Compile the backbones and FPN heads of networks that only predict, in place.

    largest_pass: the most patches a pass holds; every count up to it may get its graph.
    The frozen stage-1 branch's head (`GlobalBranch.context_maps`) runs once per image and
    stays eager."""
    model.sampled_crops = True
    # Dynamo keeps graphs per function, not per module: the backbones share one forward,
    # the heads another. The backbones' graphs: one per pass size, and the global and the
    # frozen one's for a full and a last batch of images. Past torch's limit (8 by
    # default) a function would run eager with no more than a logged warning.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, largest_pass + 4)
    nets = [model.resnet_global, model.resnet_local, model.fpn_global, model.fpn_local]
    if frozen_global is not None:
        nets.append(frozen_global.resnet_global)
    for net in nets:
        net.compile(dynamic=False)
