"""The stage runner (models/stages.py) on a small ResNet-18 GLNet: what learns in each
stage, what BatchNorm statistics move, evaluation independent of the sub-batch size, the
loss bookkeeping, and the errors for impossible calls."""
from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES
from models.glnet import BRANCH_GROUPS, GLNet, GlobalBranch
from models.stages import (LAMB_FMREG, Batch, Stage, StageResult, _Losses, run_stage, set_branch_modes,
                           stream_patch_logits)
from utils.patches import PatchGrid

N_CLASS = 4
IMAGE = (66, 70)  # a 2 x 2 grid of 64 px patches
SIZE_G = (64, 64)
SIZE_P = (64, 64)
SUB_BATCH = 2


def _model(seed: int = 0, device: str = "cpu") -> GLNet:
    torch.manual_seed(seed)
    return GLNet(N_CLASS, backbone="resnet18").to(device)


def _frozen(device: str = "cpu") -> GlobalBranch:
    torch.manual_seed(100)
    return GlobalBranch(N_CLASS, backbone="resnet18").to(device).eval()


def _batch(sizes=(IMAGE,), labels: bool = True, device: str = "cpu", seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *s, generator=g).to(device) for s in sizes]
    global_images = torch.rand(len(sizes), 3, *SIZE_G, generator=g).to(device)
    label_maps = [torch.randint(0, N_CLASS, s, generator=g).to(device) for s in sizes] if labels else None
    return Batch(images, global_images, label_maps)


def _run(stage: Stage, model: GLNet, batch: Batch, device: str = "cpu", **kwargs) -> StageResult:
    kwargs.setdefault("sub_batch_size", SUB_BATCH)
    frozen = kwargs.pop("frozen_global", _frozen(device))
    return run_stage(stage, model, batch, patch_size=SIZE_P, frozen_global=frozen, **kwargs)


# The branches in train mode while a stage trains, the rest in eval mode (the fixtures'
# protocol, docs/authors_behaviour.md section 7); they are also the groups given an lr.
AUTHORS_TRAINING_GROUPS = {
    Stage.GLOBAL: {"resnet_global", "fpn_global", "ensemble_conv"},
    Stage.GLOBAL2LOCAL: {"resnet_local", "fpn_local", "ensemble_conv"},
    Stage.LOCAL2GLOBAL: {"resnet_global", "fpn_global", "ensemble_conv"},
}


def _learns(stage: Stage, name: str) -> bool:
    """Whether a parameter gets a gradient in a stage, from its name alone."""
    group, layer = name.split(".")[:2]
    ext_layer = layer.endswith("_ext") or layer == "smooth"  # the global head's context set
    if stage is Stage.GLOBAL:
        return group == "resnet_global" or (group == "fpn_global" and not ext_layer)
    if stage is Stage.GLOBAL2LOCAL:
        return group in ("resnet_local", "fpn_local", "ensemble_conv")
    return group in ("resnet_global", "ensemble_conv") or (group == "fpn_global" and (ext_layer or layer == "classify"))


def _n_sub_batches() -> int:
    return len(PatchGrid.build(IMAGE, SIZE_P).batches(SUB_BATCH))


# --------------------------------------------------------------------------- what learns


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", list(Stage))
def test_gradients_reach_exactly_the_learning_parameters(stage, device):
    model = _model(device=device)
    set_branch_modes(model, stage, training=True)
    _run(stage, model, _batch(device=device), device, backward=True)
    learning = set()
    for name, p in model.named_parameters():
        if _learns(stage, name):
            assert p.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
            learning.add(name.split(".")[0])
        else:
            assert p.grad is None, f"unexpected gradient for {name}"
    # Whatever learns belongs to a group the stage trains (those get lr > 0).
    assert learning == AUTHORS_TRAINING_GROUPS[stage] - ({"ensemble_conv"} if stage is Stage.GLOBAL else set())


def test_set_branch_modes():
    model = _model()
    for stage in Stage:
        set_branch_modes(model, stage, training=True)
        for name in BRANCH_GROUPS:
            module = getattr(model, name)
            expected = name in AUTHORS_TRAINING_GROUPS[stage]
            assert all(m.training == expected for m in module.modules()), (stage, name)
        set_branch_modes(model, stage, training=False)
        assert not any(m.training for child in model.children() for m in child.modules())


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("stage", list(Stage))
def test_batchnorm_statistics_move_only_in_the_trained_backbone(stage):
    model, frozen = _model(), _frozen()
    before = {name: _bn_state(getattr(model, name)) for name in ("resnet_global", "resnet_local")}
    frozen_before = _bn_state(frozen)
    set_branch_modes(model, stage, training=True)
    _run(stage, model, _batch(), frozen_global=frozen, backward=True)

    trained = "resnet_local" if stage is Stage.GLOBAL2LOCAL else "resnet_global"
    # One BatchNorm update per forward through the trained backbone: once per batch for
    # the global one, once per sub-batch of patches for the local one.
    updates = _n_sub_batches() if stage is Stage.GLOBAL2LOCAL else 1
    for name, old in before.items():
        new = _bn_state(getattr(model, name))
        for key, value in old.items():
            if name != trained:
                assert torch.equal(new[key], value), f"{name}.{key} changed"
            elif key.endswith("num_batches_tracked"):
                assert new[key].item() == value.item() + updates, f"{name}.{key}"
            else:
                assert not torch.equal(new[key], value), f"{name}.{key} did not change"
    for key, value in _bn_state(frozen).items():
        assert torch.equal(value, frozen_before[key]), f"frozen {key} changed"


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("stage", [Stage.GLOBAL2LOCAL, Stage.LOCAL2GLOBAL])
def test_evaluation_does_not_depend_on_the_sub_batch_size(stage):
    model, frozen, batch = _model(), _frozen(), _batch(sizes=(IMAGE, (50, 80)))
    set_branch_modes(model, stage, training=False)
    results = []
    for size in (1, 2, 5):
        with torch.inference_mode():
            results.append(_run(stage, model, batch, frozen_global=frozen, sub_batch_size=size))
    first = results[0]
    for res in results[1:]:
        for a, b in zip(first.images, res.images):
            # Equal up to float noise: the CPU's conv kernels sum in a batch-size dependent
            # order (~1e-7 here); BatchNorm using batch statistics would be off by far more.
            for field in ("global_logits", "local_logits", "ensemble_logits"):
                torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-6, msg=field)


@pytest.mark.parametrize("stage", list(Stage))
def test_evaluation_with_labels_scores_without_gradients(stage):
    model = _model()
    set_branch_modes(model, stage, training=False)
    res = _run(stage, model, _batch())  # no inference_mode: backward=False alone must not train
    assert res.criteria and all(math.isfinite(c) and c > 0 for c in res.criteria)
    assert math.isfinite(res.loss)
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        again = _run(stage, model, _batch())
    assert again.criteria == pytest.approx(res.criteria, rel=1e-5)


@pytest.mark.parametrize("stage", list(Stage))
def test_evaluation_without_labels_has_no_losses(stage):
    model = _model()
    set_branch_modes(model, stage, training=False)
    with torch.inference_mode():
        res = _run(stage, model, _batch(labels=False))
    assert res.criteria == [] and res.totals == [] and math.isnan(res.loss)
    img = res.images[0]
    assert img.global_logits.shape == (1, N_CLASS, 16, 16)
    if stage is Stage.GLOBAL:
        assert img.grid is None and img.local_logits is None and img.ensemble_logits is None
    else:
        n = len(PatchGrid.build(IMAGE, SIZE_P))
        assert len(img.grid) == n
        assert img.local_logits.shape == img.ensemble_logits.shape == (n, N_CLASS, 16, 16)


# --------------------------------------------------------------------------- loss bookkeeping


@pytest.mark.parametrize("stage", list(Stage))
def test_loss_terms(stage):
    model = _model()
    set_branch_modes(model, stage, training=True)
    res = _run(stage, model, _batch(), backward=True)
    n_sub = _n_sub_batches()
    assert res.loss == pytest.approx(sum(res.totals) / len(res.totals), rel=1e-12)
    if stage is Stage.GLOBAL:
        assert len(res.criteria) == len(res.totals) == 1 and res.totals == res.criteria
        assert res.fmreg == []
    elif stage is Stage.GLOBAL2LOCAL:
        # Per sub-batch: focal(local), focal(ensemble); total = both + 0.15 * fmreg.
        assert len(res.criteria) == 2 * n_sub and len(res.totals) == len(res.fmreg) == n_sub
        for j, total in enumerate(res.totals):
            local, ens = res.criteria[2 * j : 2 * j + 2]
            assert total == pytest.approx(local + ens + 0.15 * res.fmreg[j], rel=1e-5)
            assert res.fmreg[j] > 0
    else:
        # focal(global), then focal(ensemble) per sub-batch; no fmreg in stage 3.
        assert len(res.criteria) == len(res.totals) == 1 + n_sub and res.totals == res.criteria
        assert res.fmreg == []


def test_fmreg_weight_is_an_argument():
    model = _model()
    set_branch_modes(model, Stage.GLOBAL2LOCAL, training=True)
    res = _run(Stage.GLOBAL2LOCAL, model, _batch(), backward=True, lamb_fmreg=2.0)
    for j, total in enumerate(res.totals):
        assert res.fmreg[j] > 0
        assert total == pytest.approx(res.criteria[2 * j] + res.criteria[2 * j + 1] + 2.0 * res.fmreg[j], rel=1e-5)


class _ScalarReads(TorchDispatchMode):
    """Counts tensor-to-Python reads of one value (`.item()`, `float(t)`, ...): on a GPU
    each one waits for every queued kernel, so the host stops feeding the device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.item, torch.ops.aten._local_scalar_dense)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backward", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("stage", list(Stage))
def test_loss_values_come_back_once_per_run_not_one_by_one(stage, backward, monkeypatch):
    """Without labels nothing is read back; with labels every loss value of the run comes
    back in one copy at its end (`tolist` of them all), never value by value: stage 2
    would otherwise wait for the device four times per micro-batch."""
    tolists = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolists.append(t.numel()) or tolist(t))
    model = _model()
    set_branch_modes(model, stage, training=backward)
    results, reads = [], []
    for labels in (False, True) if not backward else (True,):
        with torch.inference_mode(not backward), _ScalarReads() as scalar_reads:
            del tolists[:]
            results.append(_run(stage, model, _batch(labels=labels), backward=backward))
        reads.append((scalar_reads.count, list(tolists)))
    with _ScalarReads() as sanity:
        torch.ones(()).item()
    assert sanity.count == 1  # the counter sees a read of one value
    if not backward:
        assert reads[0] == (0, []) and results[0].criteria == results[0].fmreg == results[0].totals == []
    res = results[-1]
    values = len(res.criteria) + len(res.totals) + (len(res.totals) if stage is Stage.GLOBAL2LOCAL else 0)
    assert reads[-1][0] == 0 and len(reads[-1][1]) == 1 and reads[-1][1][0] >= values > 0


def test_loss_parts_are_summed_in_order_as_python_floats():
    """Stage 2's values are sums of micro-batch parts. Read back together, they must be
    the floats the parts' one-by-one reads summed in order give: with these parts, left to
    right gives 0.0 and any other order 1.0."""
    parts = [torch.tensor(2.0**53), torch.tensor(1.0), torch.tensor(-(2.0**53))]
    result = StageResult(images=[])
    losses = _Losses(result, backward=False, lamb_fmreg=LAMB_FMREG)
    losses.record_parts(parts, [parts[::-1], [torch.tensor(0.25, dtype=torch.bfloat16)]], parts)
    losses.settle()
    assert (result.fmreg, result.criteria, result.totals) == ([0.0], [1.0, 0.25], [0.0])
    assert result.loss == 0.0


def test_stage_result_loss_is_the_mean_of_totals():
    assert StageResult(images=[], totals=[1.0, 2.0, 6.0]).loss == 3.0
    assert math.isnan(StageResult(images=[]).loss)


# --------------------------------------------------------------------------- errors and batches


def test_stage3_needs_the_frozen_global_branch():
    with pytest.raises(ValueError, match="frozen"):
        _run(Stage.LOCAL2GLOBAL, _model(), _batch(), frozen_global=None)


@pytest.mark.parametrize("stage", list(Stage))
def test_backward_needs_labels(stage):
    model = _model()
    with pytest.raises(ValueError, match="labels"):
        _run(stage, model, _batch(labels=False), backward=True)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backward", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("stage", list(Stage))
def test_batch_of_images_of_different_sizes(stage, backward):
    # The second image is shorter than a patch: one row of patches 50 px high.
    sizes = (IMAGE, (50, 80))
    model = _model()
    set_branch_modes(model, stage, training=backward)
    with torch.inference_mode(not backward):
        res = _run(stage, model, _batch(sizes=sizes), backward=backward)
    assert len(res.images) == 2
    assert all(math.isfinite(c) for c in res.criteria) and res.criteria
    for img, size in zip(res.images, sizes):
        assert img.global_logits.shape == (1, N_CLASS, 16, 16)
        if stage is Stage.GLOBAL:
            continue
        grid = PatchGrid.build(size, SIZE_P)
        assert img.grid == grid
        h, w = (-(-s // 4) for s in grid.patch_size)  # stride 4, rounding up
        assert img.local_logits.shape == img.ensemble_logits.shape == (len(grid), N_CLASS, h, w)
    if stage is not Stage.GLOBAL:
        assert res.images[1].grid.patch_size == (50, 64)
        n_sub = sum(len(PatchGrid.build(s, SIZE_P).batches(SUB_BATCH)) for s in sizes)
        assert len(res.totals) == (n_sub if stage is Stage.GLOBAL2LOCAL else n_sub + 1)
    if backward:
        grads = [p.grad for n, p in model.named_parameters() if _learns(stage, n)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_stage3_reads_the_frozen_branchs_maps_and_never_runs_its_head():
    """The frozen stage-1 branch only gives context: its maps are those of its full forward,
    and its head (ps3, logits) runs neither in run_stage nor in stream_patch_logits."""
    model, frozen = _model(), _frozen()
    set_branch_modes(model, Stage.LOCAL2GLOBAL, training=False)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full, maps = frozen.global_branch(images).context(), frozen.context_maps(images)
    assert all(torch.equal(a, b) for fa, fb in zip(full, maps) for a, b in zip(fa, fb, strict=True))
    heads = []
    frozen.fpn_global.classify.register_forward_hook(lambda *args: heads.append(1))
    batch = _batch(labels=False)
    with torch.inference_mode():
        _run(Stage.LOCAL2GLOBAL, model, batch, frozen_global=frozen)
        image = batch.images[0]
        grid = PatchGrid.build(image.shape[-2:], SIZE_P)
        rows = list(stream_patch_logits(Stage.LOCAL2GLOBAL, model, image, batch.global_images[:1], grid,
                                        frozen_global=frozen))
    assert len(rows) == grid.n_rows and heads == []


@pytest.mark.parametrize("backward, checkpointing, kept", [(False, False, False), (True, False, False), (True, True, True)],
                         ids=["eval", "train", "train-checkpointing"])
def test_stage3_keeps_the_frozen_maps_for_its_global_pass_only_to_recompute(backward, checkpointing, kept):
    """The frozen stage-1 maps give the local passes their context; after them only
    recomputation (activation checkpointing) reads them again, so otherwise they must be
    gone before the global pass, whose peak they would raise."""
    model, frozen = _model(), _frozen()
    model.activation_checkpointing = checkpointing
    set_branch_modes(model, Stage.LOCAL2GLOBAL, training=backward)
    frozen_maps: list[weakref.ref] = []
    alive_at_global_pass: list[int] = []
    frozen_forward, global_forward = frozen.context_maps, model.global_branch

    def recording_frozen(*args, **kwargs):
        out = frozen_forward(*args, **kwargs)
        frozen_maps.extend(weakref.ref(m) for maps in out for m in maps)
        return out

    def counting_global(*args, **kwargs):
        alive_at_global_pass.append(sum(ref() is not None for ref in frozen_maps))
        return global_forward(*args, **kwargs)

    frozen.context_maps, model.global_branch = recording_frozen, counting_global
    _run(Stage.LOCAL2GLOBAL, model, _batch(), frozen_global=frozen, backward=backward)
    assert len(frozen_maps) == 16  # c2..c5, ps0, ps1, ps2 at four levels each
    assert alive_at_global_pass == [16 if kept else 0]


@pytest.mark.parametrize("stage", list(Stage))
def test_activation_checkpointing_changes_nothing_but_memory(stage):
    """Same losses, gradients and BatchNorm statistics (recomputation must not update the
    running statistics twice), in every stage, with stage 3's repeated backward passes."""
    images = [torch.rand(3, 150, 170), torch.rand(3, 120, 100)]
    batch = Batch(images, torch.rand(2, 3, 64, 64), [torch.randint(0, 7, img.shape[-2:]) for img in images])
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, frozen = GLNet(7, "resnet18"), GlobalBranch(7, "resnet18").eval()
        model.activation_checkpointing = checkpointing
        set_branch_modes(model, stage, training=True)
        result = run_stage(stage, model, batch, patch_size=(96, 96), sub_batch_size=4, backward=True,
                           frozen_global=frozen)
        runs.append((result.totals, dict(model.named_parameters()), model.state_dict()))
    (totals, params, state), (totals_ck, params_ck, state_ck) = runs
    assert totals == totals_ck
    for name, p in params.items():
        assert (p.grad is None) == (params_ck[name].grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, params_ck[name].grad), name
    assert all(torch.equal(state[k], state_ck[k]) for k in state)


@pytest.mark.parametrize("stage", [Stage.GLOBAL2LOCAL, Stage.LOCAL2GLOBAL])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batches_give_the_sub_batch_losses_gradients_and_statistics(stage, checkpointing):
    """Stage 2's head and losses and stage 3's frozen local passes run micro-batch by
    micro-batch; only the summation order of gradients may differ from whole sub-batches."""
    batch = _batch(sizes=((80, 70),))
    runs = []
    for micro in (None, 1, 3):
        model = _model()
        model.activation_checkpointing = checkpointing
        set_branch_modes(model, stage, training=True)
        result = _run(stage, model, batch, sub_batch_size=4, backward=True, micro_batch_size=micro)
        runs.append((result, dict(model.named_parameters()), model.state_dict()))
    whole, params, state = runs[0]
    n_sub = len(PatchGrid.build((80, 70), SIZE_P).batches(4))
    assert n_sub > 1 and len(whole.totals) == (n_sub if stage is Stage.GLOBAL2LOCAL else n_sub + 1)
    for result, params_mb, state_mb in runs[1:]:
        for values in ("criteria", "fmreg", "totals"):
            assert getattr(result, values) == pytest.approx(getattr(whole, values), rel=1e-6), values
        torch.testing.assert_close(result.images[0].ensemble_logits, whole.images[0].ensemble_logits)
        for name, p in params.items():
            assert (p.grad is None) == (params_mb[name].grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(params_mb[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
        for key, value in state.items():
            torch.testing.assert_close(state_mb[key], value, rtol=1e-5, atol=1e-7, msg=key)
