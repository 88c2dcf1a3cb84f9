"""The reference model against the authors' code (tests/fixtures/parity_seed0.*).

`reference_arrays` runs models/reference.py with the fixtures' weight rule on their 600x600
image: evaluation and one training step in each mode. Every array is compared with the
capture under the tolerances of docs/authors_behaviour.md, section 7.7. tests/test_engine.py
then holds the engine that training and prediction use to this reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DEVICES
from parity import check_gradients, check_logits, check_losses, check_predictions, global_scores, merged_scores, mode_keys
from utils.patches import PatchGrid, extract_patches
from utils.resample import resize_labels

MODES = (1, 2, 3)
by_mode = pytest.mark.parametrize("mode", MODES)
on_devices = pytest.mark.parametrize("device", DEVICES)


def _grid() -> PatchGrid:
    return PatchGrid.build((600, 600), (256, 256))


@on_devices
@by_mode
def test_every_array_of_the_mode_is_produced(parity_run, parity_ref, device, mode):
    out = parity_run("reference", device, mode)
    expected = set(mode_keys(parity_ref, mode))
    assert set(mode_keys(out, mode)) == expected
    for key in expected:
        assert out[key].shape == parity_ref[key].shape, key
        assert out[key].dtype.kind == parity_ref[key].dtype.kind, key


@on_devices
@by_mode
def test_inputs_and_targets_are_exact(parity_run, parity_ref, device, mode):
    out = parity_run("reference", device, mode)
    assert out["input_global"].dtype == np.float32
    for key in ("input_global", "train_target_global", "train_target_patches", "param_names"):
        assert np.array_equal(out[key], parity_ref[key]), key


@on_devices
@by_mode
def test_logits(parity_run, parity_ref, device, mode):
    check_logits(parity_run("reference", device, mode), parity_ref, mode)


@on_devices
@by_mode
def test_predictions(parity_run, parity_ref, device, mode):
    check_predictions(parity_run("reference", device, mode), parity_ref, mode, _grid())


@on_devices
@by_mode
def test_losses(parity_run, parity_ref, device, mode):
    out = parity_run("reference", device, mode)
    # Focal-loss values in call order and backpropagated values: sub-batches of 4, 4 and 1.
    n_criteria, n_backward = {1: (1, 1), 2: (6, 3), 3: (4, 4)}[mode]
    assert out[f"train_m{mode}_criterion"].shape == (n_criteria,)
    assert out[f"train_m{mode}_backward_loss"].shape == (n_backward,)
    assert len(mode_keys(out, mode, suffix="_fmreg")) == (2 if mode == 2 else 0)
    check_losses(out, parity_ref, mode)


@on_devices
@by_mode
def test_gradients(parity_run, parity_ref, device, mode):
    check_gradients(parity_run("reference", device, mode), parity_ref, mode)


@on_devices
def test_cross_checks(parity_run, device):
    """docs/authors_behaviour.md, section 7.6: what the modes share is computed the same way."""
    m1, m2, m3 = (parity_run("reference", device, mode) for mode in MODES)
    same = lambda a, b, what: np.testing.assert_array_equal(a, b, err_msg=what)  # noqa: E731
    same(m2["eval_m2_global_logits"], m1["eval_m1_global_logits"], "eval m2 vs m1 global")
    same(m2["train_m2_global_logits"], m1["eval_m1_global_logits"], "train m2 vs eval m1 global")
    same(m3["eval_m3_local_logits"], m2["eval_m2_local_logits"], "eval m3 vs m2 local")
    same(m3["train_m3_local_logits"], m2["eval_m2_local_logits"], "train m3 vs eval m2 local")


def test_fixture_inputs_match_the_pngs(parity_ref, parity_inputs):
    image, label = parity_inputs
    assert np.array_equal(parity_ref["image"], image)
    assert np.array_equal(parity_ref["label"], label)


def test_patch_offsets_coverage_and_patch_targets(parity_ref, parity_inputs):
    grid = _grid()
    assert np.array_equal(np.array(grid.origins(), dtype=np.int32), parity_ref["patch_top_left_px"])
    fracs = np.array([(t / 600, l / 600) for t, l in grid.origins()])
    assert np.array_equal(fracs, parity_ref["patch_top_left_frac"])
    assert np.array_equal(grid.coverage().numpy(), parity_ref["overlap_template"])
    # Patch targets: the label cut at each patch, resized with Pillow's NEAREST to size_p / 4.
    targets = resize_labels(extract_patches(torch.from_numpy(parity_inputs[1]), grid, range(len(grid))), (64, 64))
    assert np.array_equal(targets.numpy(), parity_ref["train_target_patches"])


def test_the_harness_merge_reproduces_the_captured_predictions(parity_ref, parity_meta):
    # The harness's merge applied to the captured logits gives the captured maps exactly,
    # and the capture's top-2 margin statistics.
    for mode in MODES:
        sources = {"pred_global": "global"} | ({} if mode == 1 else {"pred_local": "local", "pred": "ensemble"})
        for name, source in sources.items():
            logits = parity_ref[f"eval_m{mode}_{source}_logits"]
            scores = global_scores(logits, (600, 600)) if source == "global" else merged_scores(logits, _grid())
            assert np.array_equal(scores.argmax(0).numpy(), parity_ref[f"eval_m{mode}_{name}"]), (mode, name)
            top = scores.topk(2, dim=0).values
            margin = (top[0] - top[1]).numpy()
            counts = parity_meta["eval"][f"m{mode}"]["margin_counts"][name]
            assert {k: int((margin < float(k[1:])).sum()) for k in counts} == counts, (mode, name)
