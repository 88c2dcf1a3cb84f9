"""The engine (models/glnet.py, models/fpn.py, models/stages.py) against the reference
(models/reference.py): equal logits, argmax maps, losses and gradients in all three modes.

The engine is what training, evaluation and predict.py run: lazy crops, micro-batches, the
split ensemble convolution, banded merging, activation checkpointing. test_parity.py holds the
reference to the authors' arrays, so a change to the engine that changes the model fails here.
Tolerances are those of the authors' arrays (tests/parity.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import pytest

from conftest import DEVICES, exact_cuda_math
from parity import check_all, engine_arrays, reference_arrays
from utils.patches import PatchGrid

MODES = (1, 2, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_engine_equals_reference_on_the_fixture_image(parity_run, device, mode):
    """ResNet-50, 600 x 600, a 3 x 3 grid of 256 px patches in sub-batches of 4, 4 and 1,
    each in one pass."""
    check_all(parity_run("engine", device, mode), parity_run("reference", device, mode), mode,
              PatchGrid.build((600, 600), (256, 256)))


class Case(NamedTuple):
    image: tuple[int, int]
    size_g: tuple[int, int]
    size_p: tuple[int, int]
    sub_batch: int
    micro_batch: Optional[int]
    checkpointing: bool
    patches: int  # of the grid: 2 x 4, 4 x 2 and 1 x 1 by docs/authors_behaviour.md, section 2
    modes: tuple[int, ...]


CASES = {
    # A wide image, 2 x 4 patches in sub-batches of 3, 3 and 2, one patch per pass (the CPU's default).
    "wide-patch-by-patch": Case((100, 160), (64, 64), (80, 80), 3, 1, False, 8, (1, 2, 3)),
    # A tall image and a non-square global image, 4 x 2 patches, passes of 2 patches,
    # activation checkpointing.
    "tall-micro-checkpointed": Case((160, 100), (96, 64), (80, 80), 4, 2, True, 8, (1, 2, 3)),
    # An image smaller than the patch: one patch, the whole image (the authors divide by zero).
    "one-patch": Case((90, 70), (64, 64), (96, 96), 2, None, False, 1, (2, 3)),
}
RUNS = [(name, mode) for name, case in CASES.items() for mode in case.modes]


@pytest.fixture(scope="module")
def small_run():
    cache: dict[tuple[str, int, str], dict] = {}

    def get(name: str, mode: int, device: str) -> tuple[dict, dict]:
        if (name, mode, device) not in cache:
            case = CASES[name]
            rng = np.random.default_rng(RUNS.index((name, mode)))
            image = rng.integers(0, 256, (*case.image, 3), dtype=np.uint8)
            label = rng.integers(0, 7, case.image, dtype=np.uint8)
            args = (1, image, label, case.size_g, case.size_p, case.sub_batch, mode)
            with exact_cuda_math(device):
                ref = reference_arrays(*args, device=device, backbone="resnet18")
                prepare = lambda model: setattr(model, "activation_checkpointing", case.checkpointing)  # noqa: E731
                eng = engine_arrays(*args, device=device, backbone="resnet18", micro_batch_size=case.micro_batch,
                                    prepare=prepare)
            cache[name, mode, device] = eng, ref
        return cache[name, mode, device]

    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "mode"), RUNS)
def test_engine_equals_reference_on_other_images_and_grids(small_run, name, mode, device):
    case = CASES[name]
    engine, ref = small_run(name, mode, device)
    grid = PatchGrid.build(case.image, case.size_p)
    assert len(grid) == case.patches
    if mode > 1:
        assert engine[f"eval_m{mode}_local_logits"].shape[0] == case.patches
    check_all(engine, ref, mode, grid)
