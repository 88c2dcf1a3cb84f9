"""End-to-end numeric parity with the authors' GLNet (tests/fixtures/parity_seed0.*).

`run_parity` builds the network with the fixtures' weight rule, evaluates one 600x600
image and takes one training step in a mode; every array it returns is compared with the
capture under the tolerances of the reference README, section 7. Each (device, mode) is
run once per session and shared by all tests.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from models.glnet import BRANCH_GROUPS, GlobalBranch
from utils.parity import apply_rule_weights, run_parity
from utils.patches import PatchGrid, extract_patches, merge_logits
from utils.resample import resize_labels

MODES = (1, 2, 3)
SIZE_G = SIZE_P = (256, 256)
SUB_BATCH = 4
MARGIN = 1e-4  # argmax pixels whose reference top-2 margin is below this may flip


@contextlib.contextmanager
def _exact_cuda_math(device: str):
    """Disable TF32 on CUDA: the reference is float32 math."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def parity(parity_inputs):
    """parity(device, mode) -> run_parity's arrays, computed once per module."""
    image, label = parity_inputs
    cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def get(run: str, mode: int) -> dict[str, np.ndarray]:
        device, _, micro = run.partition(MICRO)
        if (run, mode) not in cache:
            with _exact_cuda_math(device):
                cache[run, mode] = run_parity(0, image, label, SIZE_G, SIZE_P, SUB_BATCH, mode, device=device,
                                              micro_batch_size=int(micro) if micro else None)
        return cache[run, mode]

    return get


def _grid() -> PatchGrid:
    return PatchGrid.build((600, 600), SIZE_P)


def _mode_keys(ref: dict[str, np.ndarray], mode: int, prefix: str = "", suffix: str = "") -> list[str]:
    keys = [k for k in ref if k.startswith((f"eval_m{mode}_", f"train_m{mode}_"))]
    return [k for k in keys if k.startswith(prefix) and k.endswith(suffix)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


# "cpu/micro=1": patches one at a time wherever that cannot change results (evaluation
# passes, stage 2's head in training), as the CPU default does; the others use sub-batches.
MICRO = "/micro="
on_devices = pytest.mark.parametrize("device", [*DEVICES, f"cpu{MICRO}1"])
by_mode = pytest.mark.parametrize("mode", MODES)


# --------------------------------------------------------------------------- what is produced


@on_devices
@by_mode
def test_every_array_of_the_mode_is_produced(parity, parity_ref, device, mode):
    out = parity(device, mode)
    expected = set(_mode_keys(parity_ref, mode))
    produced = {k for k in out if k.startswith(("eval_", "train_m"))}
    assert produced == expected
    for key in expected:
        assert out[key].shape == parity_ref[key].shape, key
        assert out[key].dtype.kind == parity_ref[key].dtype.kind, key


@on_devices
@by_mode
def test_inputs_and_targets_are_exact(parity, parity_ref, device, mode):
    out = parity(device, mode)
    assert out["input_global"].dtype == np.float32
    assert np.array_equal(out["input_global"], parity_ref["input_global"])
    assert np.array_equal(out["train_target_global"], parity_ref["train_target_global"])
    assert np.array_equal(out["param_names"], parity_ref["param_names"])


# --------------------------------------------------------------------------- evaluation


@on_devices
@by_mode
def test_eval_logits(parity, parity_ref, device, mode):
    out = parity(device, mode)
    keys = _mode_keys(parity_ref, mode, "eval_", "_logits")
    assert len(keys) == (1 if mode == 1 else 3)
    for key in keys:
        np.testing.assert_allclose(out[key], parity_ref[key], rtol=0, atol=1e-5, err_msg=key)


@on_devices
@by_mode
def test_eval_fmreg(parity, parity_ref, device, mode):
    out = parity(device, mode)
    if mode != 2:
        assert f"eval_m{mode}_fmreg" not in out
        return
    assert out["eval_m2_fmreg"].shape == (3,)  # sub-batches of 4, 4 and 1 patches
    np.testing.assert_allclose(out["eval_m2_fmreg"], parity_ref["eval_m2_fmreg"], rtol=1e-6, atol=0)


def _reference_scores(parity_ref, mode: int, name: str) -> torch.Tensor:
    """(K, 600, 600) float64 scores behind a reference argmax map, merged as the authors did."""
    if name == "pred_global":
        logits = torch.from_numpy(parity_ref[f"eval_m{mode}_global_logits"]).double()
        return F.interpolate(logits, size=(600, 600), mode="nearest")[0]
    source = "local" if name == "pred_local" else "ensemble"
    return merge_logits(torch.from_numpy(parity_ref[f"eval_m{mode}_{source}_logits"]).double(), _grid())


def _margin(scores: torch.Tensor) -> np.ndarray:
    top = scores.topk(2, dim=0).values
    return (top[0] - top[1]).numpy()


@on_devices
@by_mode
def test_eval_predictions(parity, parity_ref, parity_meta, device, mode):
    out = parity(device, mode)
    names = ["pred_global"] + ([] if mode == 1 else ["pred_local", "pred"])
    assert {k for k in _mode_keys(parity_ref, mode, "eval_") if "_pred" in k} == {f"eval_m{mode}_{n}" for n in names}
    for name in names:
        key = f"eval_m{mode}_{name}"
        margin = _margin(_reference_scores(parity_ref, mode, name))
        differ = out[key] != parity_ref[key]
        allowed = parity_meta["eval"][f"m{mode}"]["margin_counts"][name]["<0.0001"]
        assert differ.sum() <= allowed, key
        assert (margin[differ] < MARGIN).all(), f"{key}: a pixel with reference margin >= {MARGIN} differs"


# --------------------------------------------------------------------------- training step


@on_devices
@by_mode
def test_train_logits(parity, parity_ref, device, mode):
    out = parity(device, mode)
    keys = _mode_keys(parity_ref, mode, "train_", "_logits")
    assert len(keys) == (1 if mode == 1 else 3)
    for key in keys:
        np.testing.assert_allclose(out[key], parity_ref[key], rtol=0, atol=4e-4, err_msg=key)


@on_devices
@by_mode
def test_train_losses(parity, parity_ref, device, mode):
    out = parity(device, mode)
    # Focal-loss values in call order, backpropagated values, and the last of those.
    n_criteria, n_backward = {1: (1, 1), 2: (6, 3), 3: (4, 4)}[mode]
    assert out[f"train_m{mode}_criterion"].shape == (n_criteria,)
    assert out[f"train_m{mode}_backward_loss"].shape == (n_backward,)
    for name in ("criterion", "backward_loss", "returned_loss"):
        key = f"train_m{mode}_{name}"
        np.testing.assert_allclose(out[key], parity_ref[key], rtol=2e-5, atol=0, err_msg=key)
    if mode == 2:
        np.testing.assert_allclose(out["train_m2_fmreg"], parity_ref["train_m2_fmreg"], rtol=2e-6, atol=0)


@on_devices
@by_mode
def test_gradients(parity, parity_ref, device, mode):
    out = parity(device, mode)
    has_grad = out[f"train_m{mode}_param_has_grad"]
    assert np.array_equal(has_grad, parity_ref[f"train_m{mode}_param_has_grad"])

    groups, ref_groups = out[f"train_m{mode}_grad_norm"], parity_ref[f"train_m{mode}_grad_norm"]
    assert groups.shape == (len(BRANCH_GROUPS),)
    for i, name in enumerate(BRANCH_GROUPS):
        if ref_groups[i] == 0:
            assert groups[i] == 0, name
        else:
            # Train-mode BatchNorm backward amplifies rounding in the ResNets.
            rtol = 1e-2 if name.startswith("resnet") else 1e-5
            np.testing.assert_allclose(groups[i], ref_groups[i], rtol=rtol, atol=0, err_msg=name)

    norms, ref_norms = out[f"train_m{mode}_param_grad_norm"], parity_ref[f"train_m{mode}_param_grad_norm"]
    assert (norms[~has_grad] == 0).all()
    names = parity_ref["param_names"]
    bad = [f"{names[i]}: {norms[i]:.6g} vs {ref_norms[i]:.6g}"
           for i in np.flatnonzero(np.abs(norms - ref_norms) > 1e-3 + 3e-2 * np.abs(ref_norms))]
    assert not bad, bad[:10]


# --------------------------------------------------------------------------- cross-checks (README 6.1)


@on_devices
def test_cross_checks(parity, parity_ref, device):
    m1, m2, m3 = (parity(device, mode) for mode in MODES)
    device, _, micro = device.partition(MICRO)
    # Bit-identical on the CPU, as in the capture; other devices may pick other kernels,
    # and passes of other sizes may sum in another order.
    atol = 0.0 if device == "cpu" and not micro else 1e-6

    def same(a, b, what):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=what)

    same(m2["eval_m2_global_logits"], m1["eval_m1_global_logits"], "eval m2 vs m1 global")
    same(m2["train_m2_global_logits"], m1["eval_m1_global_logits"], "train m2 vs eval m1 global")
    same(m3["eval_m3_local_logits"], m2["eval_m2_local_logits"], "eval m3 vs m2 local")
    same(m3["train_m3_local_logits"], m2["eval_m2_local_logits"], "train m3 vs eval m2 local")

    # The frozen stage-1 global branch of mode 3 gives the eval-mode global logits.
    frozen = GlobalBranch(7).to(device).eval()
    apply_rule_weights(frozen, 0)
    with _exact_cuda_math(device), torch.inference_mode():
        logits = frozen.global_branch(torch.from_numpy(m1["input_global"]).to(device)).logits
    same(logits.cpu().numpy(), m1["eval_m1_global_logits"], "global_fixed vs eval m1 global")


# --------------------------------------------------------------------------- arrays outside run_parity


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
    label = torch.from_numpy(parity_inputs[1])
    targets = resize_labels(extract_patches(label, grid, range(len(grid))), (64, 64))
    assert np.array_equal(targets.numpy(), parity_ref["train_target_patches"])


def test_merging_reference_logits_reproduces_reference_predictions(parity_ref, parity_meta):
    # Our merge rules applied to the reference logits give the reference maps exactly,
    # and the same top-2 margin statistics as the capture.
    for mode in MODES:
        names = ["pred_global"] + ([] if mode == 1 else ["pred_local", "pred"])
        for name in names:
            scores = _reference_scores(parity_ref, mode, name)
            assert np.array_equal(scores.argmax(0).numpy(), parity_ref[f"eval_m{mode}_{name}"]), (mode, name)
            margin = _margin(scores)
            counts = parity_meta["eval"][f"m{mode}"]["margin_counts"][name]
            assert {k: int((margin < float(k[1:])).sum()) for k in counts} == counts, (mode, name)


# --------------------------------------------------------------------------- run_parity on other inputs


@pytest.mark.parametrize("device", DEVICES)
def test_run_parity_on_a_non_square_image(parity_ref, device):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    label = rng.integers(0, 7, (300, 420), dtype=np.uint8)
    with _exact_cuda_math(device):
        out = run_parity(3, image, label, (128, 128), (160, 160), 4, 1, device=device)
    assert set(_mode_keys(out, 1)) == set(_mode_keys(parity_ref, 1))
    logits = out["eval_m1_global_logits"]
    assert logits.shape == (1, 7, 32, 32) and np.isfinite(logits).all()
    pred = out["eval_m1_pred_global"]
    assert pred.shape == (300, 420) and pred.max() < 7
    expected = F.interpolate(torch.from_numpy(logits), size=(300, 420), mode="nearest")[0].argmax(0).numpy()
    assert np.array_equal(pred, expected)
    assert out["input_global"].shape == (1, 3, 128, 128)
    assert 0 <= out["input_global"].min() and out["input_global"].max() <= 1
    target = resize_labels(torch.from_numpy(label), (32, 32)).numpy()
    assert np.array_equal(out["train_target_global"], target[None])
    criterion = out["train_m1_criterion"]
    assert criterion.shape == (1,) and np.isfinite(criterion).all() and criterion[0] > 0
    assert out["train_m1_returned_loss"] == criterion[0]
    assert out["train_m1_global_logits"].shape == (1, 7, 32, 32)
    # Which parameters learn is a property of the mode, not of the input.
    assert np.array_equal(out["train_m1_param_has_grad"], parity_ref["train_m1_param_has_grad"])
    assert np.isfinite(out["train_m1_grad_norm"]).all() and out["train_m1_grad_norm"][0] > 0
