"""Numeric parity with the authors' GLNet.

`rule_tensor` and `apply_rule_weights` rebuild the deterministic weights the reference fixtures were made with
(shared/reference/README.md, section 3); `run_parity` runs evaluation and one training
step of a mode on one image and returns every quantity the fixtures capture, under the
fixtures' names, for any seed, image, label and configuration.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dataset.transforms import global_image, to_unit_float
from models.glnet import BRANCH_GROUPS, GLNet, GlobalBranch
from models.stages import Batch, Stage, StageResult, run_stage, set_branch_modes
from utils.patches import merge_argmax, upsample_argmax
from utils.resample import resize_labels

def rule_tensor(key: str, like: Tensor, seed: int) -> Tensor:
    """The fixture rule's value for one state-dict key (no `module.` prefix)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros_like(like)
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + seed) % 2**31)
    shape = tuple(like.shape)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) == 4:
        return torch.randn(shape, generator=g) * math.sqrt(1.0 / (shape[1] * shape[2] * shape[3]))
    if key.endswith("weight"):
        return 0.5 + 0.1 * torch.randn(shape, generator=g)
    if key.endswith("bias"):
        return 0.05 * torch.randn(shape, generator=g)
    raise ValueError(f"the weight rule does not cover {key!r}")


def apply_rule_weights(model: torch.nn.Module, seed: int) -> None:
    model.load_state_dict({k: rule_tensor(k, v, seed) for k, v in model.state_dict().items()})


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def run_parity(
    seed: int,
    image: np.ndarray,
    label: np.ndarray,
    size_g: Sequence[int],
    size_p: Sequence[int],
    sub_batch_size: int,
    mode: int,
    device: str | torch.device = "cpu",
    n_class: int = 7,
    micro_batch_size: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Evaluation and one training step of `mode` on one image with rule weights.
    micro_batch_size: as helper.Session uses it (patches per evaluation pass, and per pass
    of stage 2's head in training); None for whole sub-batches everywhere.

    image: (H, W, 3) uint8; label: (H, W) class ids. Returns arrays named as in
    parity_seed0.npz (eval_mX_*, train_mX_*).
    """
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
        frozen = GlobalBranch(n_class).to(device)
        apply_rule_weights(frozen, seed)
        frozen.eval()
    kwargs = dict(patch_size=size_p, frozen_global=frozen, micro_batch_size=micro_batch_size)
    out: dict[str, np.ndarray] = {}

    model = GLNet(n_class).to(device)
    apply_rule_weights(model, seed)
    set_branch_modes(model, stage, training=False)
    with torch.inference_mode():
        res = run_stage(stage, model, batch, sub_batch_size=micro_batch_size or sub_batch_size, **kwargs)
    _record(out, f"eval_m{mode}", res, image.shape[:2])
    if stage is Stage.GLOBAL2LOCAL:
        out["eval_m2_fmreg"] = _per_sub_batch(
            res.fmreg, len(res.images[0].grid), micro_batch_size or sub_batch_size, sub_batch_size  # type: ignore[arg-type]
        )

    model = GLNet(n_class).to(device)
    apply_rule_weights(model, seed)
    set_branch_modes(model, stage, training=True)
    res = run_stage(stage, model, batch, sub_batch_size=sub_batch_size, backward=True, **kwargs)
    _record(out, f"train_m{mode}", res, None)
    out[f"train_m{mode}_criterion"] = np.array(res.criteria)
    out[f"train_m{mode}_backward_loss"] = np.array(res.totals)
    out[f"train_m{mode}_returned_loss"] = np.array(res.totals[-1])
    if stage is Stage.GLOBAL2LOCAL:
        out["train_m2_fmreg"] = np.array(res.fmreg)
    params = dict(model.named_parameters())
    out[f"train_m{mode}_param_has_grad"] = np.array([p.grad is not None for p in params.values()])
    out[f"train_m{mode}_param_grad_norm"] = np.array(
        [0.0 if p.grad is None else p.grad.double().norm().item() for p in params.values()]
    )
    out[f"train_m{mode}_grad_norm"] = np.array(
        [group_grad_norm(getattr(model, g)) for g in BRANCH_GROUPS]
    )
    out["param_names"] = np.array(list(params))
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


def group_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients of a parameter group (0 when none has a gradient)."""
    grads = [p.grad.double().norm() ** 2 for p in module.parameters() if p.grad is not None]
    return math.sqrt(sum(g.item() for g in grads)) if grads else 0.0


def _record(out: dict[str, np.ndarray], prefix: str, res: StageResult, image_size) -> None:
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
