"""The authors' parity protocol (docs/authors_behaviour.md, section 7), runnable on any input.

Networks get the deterministic weights the fixtures were made with (utils/weight_rule.py,
section 7.2). `reference_arrays` runs evaluation and one training step of a mode through the
reference model (models/reference.py) and `engine_arrays` through the engine that training
and prediction use (models/stages.py); both return the quantities the fixtures capture, under
the fixtures' names (tests/fixtures/parity_seed0.npz), for any seed, image, label, sizes,
backbone and device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dataset.transforms import global_image
from models import reference
from models.compiled import compile_for_inference
from models.glnet import BRANCH_GROUPS, GLNet, GlobalBranch
from models.stages import Batch, Stage, StageResult, run_stage, set_branch_modes
from utils.images import to_unit_float
from utils.patches import PatchGrid, merge_argmax, upsample_argmax
from utils.resample import resize_labels
from utils.weight_rule import apply_rule_weights

Arrays = dict[str, np.ndarray]


def group_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients of a parameter group (0 when none has a gradient)."""
    grads = [p.grad.double().norm() ** 2 for p in module.parameters() if p.grad is not None]
    return math.sqrt(sum(g.item() for g in grads)) if grads else 0.0


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _gradients(out: Arrays, prefix: str, model: torch.nn.Module) -> None:
    params = dict(model.named_parameters())
    out[f"{prefix}_param_has_grad"] = np.array([p.grad is not None for p in params.values()])
    out[f"{prefix}_param_grad_norm"] = np.array(
        [0.0 if p.grad is None else p.grad.double().norm().item() for p in params.values()]
    )
    out[f"{prefix}_grad_norm"] = np.array([group_grad_norm(getattr(model, g)) for g in BRANCH_GROUPS])
    out["param_names"] = np.array(list(params))


def _losses(out: Arrays, prefix: str, criteria: list[float], totals: list[float]) -> None:
    out[f"{prefix}_criterion"] = np.array(criteria)
    out[f"{prefix}_backward_loss"] = np.array(totals)
    out[f"{prefix}_returned_loss"] = np.array(totals[-1])


# ------------------------------------------------------------------------- the reference


def _pil_resize(array: np.ndarray, size: Sequence[int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((int(size[1]), int(size[0])), resample))


def merged_scores(patch_logits: np.ndarray | Tensor, grid: PatchGrid) -> Tensor:
    """The authors' merge: each patch's logits (N, K, h, w) upsampled (nearest) to the patch
    and summed into a float64 canvas (K, H, W), whose argmax is the prediction."""
    canvas = torch.zeros((patch_logits.shape[1], *grid.image_size), dtype=torch.float64)
    ph, pw = grid.patch_size
    for i, logits in enumerate(torch.as_tensor(patch_logits).cpu()):
        t, l = grid.origin(i)
        canvas[:, t : t + ph, l : l + pw] += _nearest(logits[None], (ph, pw))[0]
    return canvas


def global_scores(global_logits: np.ndarray | Tensor, image_size: Sequence[int]) -> Tensor:
    """(K, H, W): the global logits upsampled (nearest) to the image, whose argmax is the prediction."""
    return _nearest(torch.as_tensor(global_logits).cpu(), image_size)[0]


def _nearest(logits: Tensor, size: Sequence[int]) -> Tensor:
    # In the logits' own float32, as the authors ran it: torch picks the source index in the
    # input's precision, and float64 rounds some products (like 115 * 16 / 230) the other way.
    return F.interpolate(logits, size=tuple(size), mode="nearest").double()


def _argmax(scores: Tensor) -> np.ndarray:
    return scores.argmax(0).numpy().astype(np.uint8)


def reference_arrays(
    seed: int, image: np.ndarray, label: np.ndarray, size_g: Sequence[int], size_p: Sequence[int],
    sub_batch_size: int, mode: int, device: str | torch.device = "cpu", n_class: int = 7,
    backbone: str = "resnet50",
) -> Arrays:
    """Evaluation and one training step of `mode` on one image (H, W, 3) uint8 with label
    (H, W), through models/reference.py; inputs and targets made with Pillow, as the authors'
    data loader made them. Returns arrays named as in parity_seed0.npz."""
    device = torch.device(device)
    grid = PatchGrid.build(image.shape[:2], size_p)
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255).to(device)
    image_g = _pil_resize(image, size_g, Image.Resampling.BILINEAR)
    image_g = torch.from_numpy(image_g.copy()).permute(2, 0, 1)[None].float().div(255).to(device)
    out_size = [s // 4 for s in size_g]
    target_g = torch.from_numpy(_pil_resize(np.asarray(label, np.uint8), out_size, Image.Resampling.NEAREST).copy())
    cuts = [np.asarray(label, np.uint8)[t : t + grid.patch_size[0], l : l + grid.patch_size[1]] for t, l in grid.origins()]
    # At the logits' size: the stride-2 stem convolution and max-pool round up.
    logits_size = [math.ceil(math.ceil(s / 2) / 2) for s in grid.patch_size]
    target_p = torch.from_numpy(np.stack([_pil_resize(c, logits_size, Image.Resampling.NEAREST) for c in cuts]))
    targets = (target_g[None].to(device), target_p.to(device))

    def network() -> reference.GLNet:
        net = reference.GLNet(n_class, backbone).to(device)
        apply_rule_weights(net, seed)
        return net

    frozen = network().eval() if mode == 3 else None
    out: Arrays = {"input_global": _numpy(image_g), "train_target_global": _numpy(targets[0]).astype(np.uint8),
                   "train_target_patches": _numpy(targets[1]).astype(np.uint8)}
    model = network()
    reference.set_modes(model, mode, training=False)
    with torch.no_grad():
        res = reference.run(model, mode, image_t, image_g, grid, sub_batch_size, frozen)
    _record_reference(out, f"eval_m{mode}", res, image.shape[:2], grid)
    if mode == 2:
        out["eval_m2_fmreg"] = np.array(res["fmreg"])
    model = network()
    reference.set_modes(model, mode, training=True)
    res = reference.run(model, mode, image_t, image_g, grid, sub_batch_size, frozen, targets, backward=True)
    _record_reference(out, f"train_m{mode}", res, None, grid)
    _losses(out, f"train_m{mode}", res["criteria"], res["totals"])
    if mode == 2:
        out["train_m2_fmreg"] = np.array(res["fmreg"])
    _gradients(out, f"train_m{mode}", model)
    return out


def _record_reference(out: Arrays, prefix: str, res: dict[str, list], image_size, grid: PatchGrid) -> None:
    global_logits = res["global"][0]
    out[f"{prefix}_global_logits"] = _numpy(global_logits)
    if res["local"]:
        out[f"{prefix}_local_logits"] = _numpy(torch.cat(res["local"]))
        out[f"{prefix}_ensemble_logits"] = _numpy(torch.cat(res["ensemble"]))
    if image_size is None:
        return
    out[f"{prefix}_pred_global"] = _argmax(global_scores(global_logits, image_size))
    if res["local"]:
        out[f"{prefix}_pred_local"] = _argmax(merged_scores(torch.cat(res["local"]), grid))
        out[f"{prefix}_pred"] = _argmax(merged_scores(torch.cat(res["ensemble"]), grid))


# ------------------------------------------------------------------------- the engine


def engine_arrays(
    seed: int, image: np.ndarray, label: np.ndarray, size_g: Sequence[int], size_p: Sequence[int],
    sub_batch_size: int, mode: int, device: str | torch.device = "cpu", n_class: int = 7,
    backbone: str = "resnet50", micro_batch_size: Optional[int] = None,
    prepare: Callable[[GLNet], None] = lambda model: None, compiled: bool = False,
) -> Arrays:
    """As reference_arrays, through the engine and its own input pipeline (global_image,
    resize_labels). micro_batch_size: as helper.Session uses it (patches per evaluation pass,
    and per pass of stage 2's head in training); None for whole sub-batches everywhere.
    prepare: applied to each model before it runs (e.g. to turn on activation checkpointing).
    compiled: the evaluation alone, with the networks compiled (models/compiled.py)."""
    stage = Stage(mode)
    device = torch.device(device)
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    batch = Batch(
        images=[to_unit_float(image_t).to(device)],
        global_images=global_image(image_t, size_g)[None].to(device),
        labels=[torch.from_numpy(np.asarray(label, dtype=np.int64)).to(device)],
    )
    frozen = None
    if stage is Stage.LOCAL2GLOBAL:
        frozen = GlobalBranch(n_class, backbone).to(device)
        apply_rule_weights(frozen, seed)
        frozen.eval()
    kwargs = dict(patch_size=size_p, frozen_global=frozen, micro_batch_size=micro_batch_size)

    def network() -> GLNet:
        net = GLNet(n_class, backbone).to(device)
        apply_rule_weights(net, seed)
        prepare(net)
        return net

    out: Arrays = {}
    model = network()
    set_branch_modes(model, stage, training=False)
    if compiled:
        compile_for_inference(model, frozen)
    with torch.inference_mode():
        res = run_stage(stage, model, batch, sub_batch_size=micro_batch_size or sub_batch_size, **kwargs)
    _record_engine(out, f"eval_m{mode}", res, image.shape[:2])
    if stage is Stage.GLOBAL2LOCAL:
        out["eval_m2_fmreg"] = _per_sub_batch(
            res.fmreg, len(res.images[0].grid), micro_batch_size or sub_batch_size, sub_batch_size  # type: ignore[arg-type]
        )
    if compiled:
        return out

    model = network()
    set_branch_modes(model, stage, training=True)
    res = run_stage(stage, model, batch, sub_batch_size=sub_batch_size, backward=True, **kwargs)
    _record_engine(out, f"train_m{mode}", res, None)
    _losses(out, f"train_m{mode}", res.criteria, res.totals)
    if stage is Stage.GLOBAL2LOCAL:
        out["train_m2_fmreg"] = np.array(res.fmreg)
    _gradients(out, f"train_m{mode}", model)
    out["input_global"] = _numpy(batch.global_images)
    out["train_target_global"] = _numpy(resize_labels(batch.labels[0], [s // 4 for s in size_g])[None]).astype(np.uint8)
    return out


def _per_sub_batch(means: list[float], n_patches: int, pass_size: int, sub_batch_size: int) -> np.ndarray:
    """Per-pass means of equally sized patches regrouped into per-sub-batch means, as the
    reference records them (a pass size must divide the sub-batch size)."""
    if sub_batch_size % pass_size:
        raise ValueError(f"micro_batch_size {pass_size} must divide sub_batch_size {sub_batch_size}")
    counts = [min(pass_size, n_patches - i * pass_size) for i in range(len(means))]
    per = sub_batch_size // pass_size
    return np.array([
        np.dot(means[i : i + per], counts[i : i + per]) / sum(counts[i : i + per]) for i in range(0, len(means), per)
    ])


def _record_engine(out: Arrays, prefix: str, res: StageResult, image_size) -> None:
    img = res.images[0]
    out[f"{prefix}_global_logits"] = _numpy(img.global_logits)
    if img.local_logits is not None:
        out[f"{prefix}_local_logits"] = _numpy(img.local_logits)
        out[f"{prefix}_ensemble_logits"] = _numpy(img.ensemble_logits)
    if image_size is None:
        return
    out[f"{prefix}_pred_global"] = _numpy(upsample_argmax(img.global_logits[0], image_size)).astype(np.uint8)
    if img.local_logits is not None:
        out[f"{prefix}_pred_local"] = _numpy(merge_argmax(img.local_logits, img.grid)).astype(np.uint8)
        out[f"{prefix}_pred"] = _numpy(merge_argmax(img.ensemble_logits, img.grid)).astype(np.uint8)


# ------------------------------------------------------------------------- comparisons

# Tolerances: about ten times the authors' own float noise between 1 and 2 threads
# (docs/authors_behaviour.md, section 7.7).
EVAL_LOGITS_ATOL = 1e-5
TRAIN_LOGITS_ATOL = 4e-4
LOSS_RTOL = 2e-5
FMREG_RTOL = {"eval": 1e-6, "train": 2e-6}
MARGIN = 1e-4  # argmax pixels whose expected top-2 margin is below this may flip


def mode_keys(arrays: Arrays, mode: int, prefix: str = "", suffix: str = "") -> list[str]:
    keys = [k for k in arrays if k.startswith((f"eval_m{mode}_", f"train_m{mode}_"))]
    return [k for k in keys if k.startswith(prefix) and k.endswith(suffix)]


def check_logits(out: Arrays, expected: Arrays, mode: int) -> None:
    keys = mode_keys(expected, mode, suffix="_logits")
    assert len(keys) == (2 if mode == 1 else 6)
    for key in keys:
        atol = EVAL_LOGITS_ATOL if key.startswith("eval_") else TRAIN_LOGITS_ATOL
        np.testing.assert_allclose(out[key], expected[key], rtol=0, atol=atol, err_msg=key)


def check_predictions(out: Arrays, expected: Arrays, mode: int, grid: PatchGrid) -> None:
    """Argmax maps equal wherever the expected scores' top-2 margin is at least MARGIN."""
    names = {"pred_global": "global"} if mode == 1 else {"pred_global": "global", "pred_local": "local", "pred": "ensemble"}
    assert {k for k in mode_keys(expected, mode, "eval_") if "_pred" in k} == {f"eval_m{mode}_{n}" for n in names}
    for name, source in names.items():
        logits = expected[f"eval_m{mode}_{source}_logits"]
        scores = global_scores(logits, grid.image_size) if source == "global" else merged_scores(logits, grid)
        top = scores.topk(2, dim=0).values
        margin = (top[0] - top[1]).numpy()
        key = f"eval_m{mode}_{name}"
        differ = out[key] != expected[key]
        assert (margin[differ] < MARGIN).all(), f"{key}: {int(differ.sum())} pixels differ, some with margin >= {MARGIN}"


def check_losses(out: Arrays, expected: Arrays, mode: int) -> None:
    for name in ("criterion", "backward_loss", "returned_loss"):
        key = f"train_m{mode}_{name}"
        assert out[key].shape == expected[key].shape, key
        np.testing.assert_allclose(out[key], expected[key], rtol=LOSS_RTOL, atol=0, err_msg=key)
    for key in mode_keys(expected, mode, suffix="_fmreg"):
        rtol = FMREG_RTOL[key.split("_")[0]]
        np.testing.assert_allclose(out[key], expected[key], rtol=rtol, atol=0, err_msg=key)


def check_gradients(out: Arrays, expected: Arrays, mode: int) -> None:
    has_grad = out[f"train_m{mode}_param_has_grad"]
    assert np.array_equal(has_grad, expected[f"train_m{mode}_param_has_grad"])
    groups, expected_groups = out[f"train_m{mode}_grad_norm"], expected[f"train_m{mode}_grad_norm"]
    assert groups.shape == (len(BRANCH_GROUPS),)
    for i, name in enumerate(BRANCH_GROUPS):
        if expected_groups[i] == 0:
            assert groups[i] == 0, name
        else:
            # Train-mode BatchNorm backward amplifies rounding in the ResNets.
            rtol = 1e-2 if name.startswith("resnet") else 1e-5
            np.testing.assert_allclose(groups[i], expected_groups[i], rtol=rtol, atol=0, err_msg=name)
    norms, expected_norms = out[f"train_m{mode}_param_grad_norm"], expected[f"train_m{mode}_param_grad_norm"]
    assert (norms[~has_grad] == 0).all()
    names = expected["param_names"]
    bad = [f"{names[i]}: {norms[i]:.6g} vs {expected_norms[i]:.6g}"
           for i in np.flatnonzero(np.abs(norms - expected_norms) > 3e-2 * np.abs(expected_norms))]
    assert not bad, bad[:10]


def check_all(out: Arrays, expected: Arrays, mode: int, grid: PatchGrid) -> None:
    """Every array of the mode produced, with the expected shapes and kinds, and equal."""
    keys = set(mode_keys(expected, mode))
    assert set(mode_keys(out, mode)) == keys
    for key in keys:
        assert out[key].shape == expected[key].shape, key
        assert out[key].dtype.kind == expected[key].dtype.kind, key
    assert np.array_equal(out["input_global"], expected["input_global"])
    assert np.array_equal(out["train_target_global"], expected["train_target_global"])
    assert np.array_equal(out["param_names"], expected["param_names"])
    check_logits(out, expected, mode)
    check_predictions(out, expected, mode, grid)
    check_losses(out, expected, mode)
    check_gradients(out, expected, mode)
