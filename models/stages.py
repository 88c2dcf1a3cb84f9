"""The three GLNet stages as one runner shared by training and evaluation.

Everything that differs between stages and is not control flow (what learns, defaults,
which checkpoint initialises what, which predictions exist) is data in STAGES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from models.fpn import Context, Levels
from models.glnet import (BranchOutput, Canvases, GLNet, GlobalBranch, empty_canvases, image_context,
                          normalised_context, paste_context)
from utils.floats import sum_in_order
from utils.images import to_unit_float
from utils.losses import focal_loss, fmreg_loss
from utils.patches import PatchGrid, chunks, extract_patches
from utils.resample import resize_labels


# The authors' run (docs/authors_behaviour.md, section 5), the defaults of every command-line tool.
AUTHORS_SIZE = (508, 508)  # size_g and size_p
SUB_BATCH_SIZE = 6
LAMB_FMREG = 0.15


class Stage(IntEnum):
    """The values are the authors' `--mode`."""

    GLOBAL = 1
    GLOBAL2LOCAL = 2
    LOCAL2GLOBAL = 3


@dataclass(frozen=True)
class Load:
    """Initialise `keys` ("all", "global" or "non_local") of the model from the file named
    by the command-line flag `flag`."""

    flag: str
    keys: str = "all"


@dataclass(frozen=True)
class StageSpec:
    name: str
    checkpoint_flag: str  # the flag by which later stages and evaluation name this stage's weights
    trains: tuple[str, ...]  # parameter groups that learn; the others get lr 0 and eval mode
    epochs: int
    lr: float
    predictions: tuple[str, ...]
    train_loads: tuple[Load, ...]
    eval_loads: tuple[Load, ...]
    # Backbones that training starts from torchvision's ImageNet weights (--pretrained). The
    # authors' network constructor loads ImageNet into both ResNets every time and their
    # loader lays a checkpoint's keys over it, so a backbone no train_loads covers keeps
    # ImageNet: both in stage 1, the local one in stage 2 (docs/authors_behaviour.md, section 1).
    imagenet: tuple[str, ...] = ()
    frozen_global: Optional[str] = None  # flag of the file holding the frozen stage-1 global branch

    def reads(self, training: bool) -> tuple[str, ...]:
        """The checkpoint flags a run of this stage reads, the file it starts from first."""
        flags = [load.flag for load in (self.train_loads if training else self.eval_loads)]
        if self.frozen_global:
            flags.append(self.frozen_global)
        return tuple(dict.fromkeys(flags))


GLOBAL_GROUPS = ("resnet_global", "fpn_global", "ensemble_conv")
LOCAL_GROUPS = ("resnet_local", "fpn_local", "ensemble_conv")
ALL_PREDICTIONS = ("global", "local", "ensemble")

STAGES: dict[Stage, StageSpec] = {
    Stage.GLOBAL: StageSpec(
        "global", "path_g", GLOBAL_GROUPS, epochs=120, lr=5e-5, predictions=("global",),
        train_loads=(), eval_loads=(Load("path_g", "non_local"),), imagenet=("resnet_global", "resnet_local"),
    ),
    Stage.GLOBAL2LOCAL: StageSpec(
        "global2local", "path_g2l", LOCAL_GROUPS, epochs=50, lr=2e-5, predictions=ALL_PREDICTIONS,
        train_loads=(Load("path_g", "non_local"),), eval_loads=(Load("path_g2l"),), imagenet=("resnet_local",),
    ),
    Stage.LOCAL2GLOBAL: StageSpec(
        "local2global", "path_l2g", GLOBAL_GROUPS, epochs=120, lr=5e-5, predictions=ALL_PREDICTIONS,
        train_loads=(Load("path_g2l"),), eval_loads=(Load("path_l2g"),), frozen_global="path_g",
    ),
}


CHECKPOINT_FLAGS: dict[str, Stage] = {spec.checkpoint_flag: stage for stage, spec in STAGES.items()}


def checkpoint_uses(flag: str) -> str:
    """Where a checkpoint flag is read, e.g. "mode 1 evaluation, mode 2 training"."""
    uses = []
    for stage, spec in STAGES.items():
        read = [when for when, loads in (("training", spec.train_loads), ("evaluation", spec.eval_loads))
                if spec.frozen_global == flag or any(load.flag == flag for load in loads)]
        if read:
            uses.append(f"mode {int(stage)} {' and '.join(read)}")
    return ", ".join(uses)


def set_branch_modes(model: GLNet, stage: Stage, training: bool) -> None:
    """Train mode (batch statistics in BatchNorm) for the groups the stage trains, eval
    mode for everything else; everything in eval mode when not training."""
    trains = STAGES[stage].trains if training else ()
    for name, module in model.named_children():
        module.train(name in trains)


@dataclass
class ImageResult:
    """Logits of one image. Global: (1, K, hg, wg); local / ensemble: (N, K, h, w) per patch
    of `grid`, or None in stage 1."""

    global_logits: Tensor
    grid: Optional[PatchGrid] = None
    local_logits: Optional[Tensor] = None
    ensemble_logits: Optional[Tensor] = None

    def patch_logits(self, kind: str) -> Tensor:
        """The per-patch logits of a patch-based prediction kind ("local" or "ensemble")."""
        logits = {"local": self.local_logits, "ensemble": self.ensemble_logits}[kind]
        if logits is None:
            raise ValueError(f"this stage has no {kind} prediction")
        return logits


# Stage 3's first pass over a large image as kept: the canvases' buffers and the patches
# added into them; and what is told them after each micro-batch (buffers, done, total).
FirstPass = tuple[Sequence[Tensor], int]
KeepFirstPass = Callable[[Sequence[Tensor], int, int], None]


@dataclass
class StageResult:
    images: list[ImageResult]
    criteria: list[float] = field(default_factory=list)  # every focal-loss value, in call order
    fmreg: list[float] = field(default_factory=list)  # per sub-batch (stage 2, with labels)
    totals: list[float] = field(default_factory=list)  # every loss that is (or would be) backpropagated

    @property
    def loss(self) -> float:
        """Mean of the backpropagated losses of the batch: what training logs."""
        return sum_in_order(self.totals) / len(self.totals) if self.totals else float("nan")


@dataclass
class Batch:
    """images: (3, H, W) each, uint8 or float in [0, 1] (sizes may differ; uint8 keeps a
    huge image at a quarter of the memory, patches are converted as they are cut);
    global_images: (B, 3, Hg, Wg) float; labels: (H, W) class ids each, or None when there
    is nothing to score."""

    images: Sequence[Tensor]
    global_images: Tensor
    labels: Optional[Sequence[Tensor]] = None


class _Losses:
    """Computes the loss terms when labels exist and backpropagates them when training;
    lamb_fmreg weighs stage 2's feature-map regularisation.

    Their values reach the StageResult at the end of the run (`settle`), all in one copy
    to the host: reading each as it is made would make the host wait for the device at
    every sub-batch, with nothing queued behind it.
    """

    def __init__(self, result: StageResult, backward: bool, lamb_fmreg: float) -> None:
        self.result, self.backward, self.lamb_fmreg = result, backward, lamb_fmreg
        self._pending: list[tuple[list[float], list[Tensor]]] = []  # (result list, terms of one value)

    def focal(self, logits: Tensor, target: Optional[Tensor]) -> Optional[Tensor]:
        if target is None:
            return None
        loss = focal_loss(logits, target)
        self._pending.append((self.result.criteria, [loss.detach()]))
        return loss

    def step(self, loss: Optional[Tensor], retain_graph: bool = False) -> None:
        if loss is None:
            return
        self._pending.append((self.result.totals, [loss.detach()]))
        if self.backward:
            loss.backward(retain_graph=retain_graph)

    def record_parts(self, fmreg: Sequence[Tensor], criteria: Sequence[Sequence[Tensor]], total: Sequence[Tensor]) -> None:
        """A step whose terms were computed and backpropagated in parts (stage 2's
        micro-batches), given detached: each value is the sum of its parts."""
        self._pending.append((self.result.fmreg, list(fmreg)))
        self._pending += [(self.result.criteria, list(parts)) for parts in criteria]
        self._pending.append((self.result.totals, list(total)))

    def settle(self) -> None:
        """Write every pending value into the result as a Python float: each term read
        exactly (through float64), the parts of one value summed in order."""
        terms = [t for _, parts in self._pending for t in parts]
        if not terms:
            return
        values = iter(torch.stack(terms).double().tolist())  # stack widens mixed dtypes exactly
        for into, parts in self._pending:
            into.append(sum_in_order(next(values) for _ in parts))
        self._pending = []


def _patches(image: Tensor, grid: PatchGrid, indices: range) -> Tensor:
    return to_unit_float(extract_patches(image, grid, indices))


def _patch_targets(label: Optional[Tensor], grid: PatchGrid, indices: range, size: Sequence[int]) -> Optional[Tensor]:
    return None if label is None else resize_labels(extract_patches(label, grid, indices), size)


def run_stage(
    stage: Stage,
    model: GLNet,
    batch: Batch,
    *,
    patch_size: Sequence[int],
    sub_batch_size: int,
    frozen_global: Optional[GlobalBranch] = None,
    lamb_fmreg: float = LAMB_FMREG,
    backward: bool = False,
    micro_batch_size: Optional[int] = None,
    on_patches: Optional[Callable[[int], None]] = None,
) -> StageResult:
    """Run one stage on a batch: logits for every image, loss terms when labels are given,
    and, with backward=True, gradients accumulated in the model (no optimizer step).

    Branch train/eval modes are the caller's (see set_branch_modes); evaluation callers
    wrap this in torch.inference_mode(). micro_batch_size: patches per pass of the parts
    that no BatchNorm statistics couple (stage 2's head and losses, stage 3's frozen local
    branch); None for the whole sub-batch. on_patches: told how many patches each pass of
    the local branch finished, for progress.
    """
    if backward and batch.labels is None:
        raise ValueError("training needs labels")
    if stage is Stage.LOCAL2GLOBAL and frozen_global is None:
        raise ValueError("stage 3 needs the frozen stage-1 global branch")
    result = StageResult(images=[])
    run = _Run(
        model,
        batch,
        labels=list(batch.labels) if batch.labels is not None else [None] * len(batch.images),
        grids=[PatchGrid.build(img.shape[-2:], patch_size) for img in batch.images],
        sub_batch_size=sub_batch_size,
        micro_batch_size=micro_batch_size or sub_batch_size,
        losses=_Losses(result, backward, lamb_fmreg),
        frozen_global=frozen_global,
        on_patches=on_patches or (lambda n: None),
    )
    result.images = _RUNNERS[stage](run)
    run.losses.settle()
    return result


@dataclass
class _Run:
    """One call of run_stage, as its stage's runner sees it."""

    model: GLNet
    batch: Batch
    labels: list[Optional[Tensor]]
    grids: list[PatchGrid]
    sub_batch_size: int
    micro_batch_size: int
    losses: _Losses
    frozen_global: Optional[GlobalBranch]
    on_patches: Callable[[int], None]


def _run_global(run: _Run) -> list[ImageResult]:
    out = run.model.global_branch(run.batch.global_images)
    run.losses.step(run.losses.focal(out.logits, _global_targets(run.labels, out)))
    return [ImageResult(out.logits[i : i + 1]) for i in range(len(run.batch.images))]


def _run_global2local(run: _Run) -> list[ImageResult]:
    with torch.no_grad():
        glob = run.model.global_branch(run.batch.global_images)
    images = []
    for i, (image, label, grid) in enumerate(zip(run.batch.images, run.labels, run.grids)):
        context = glob.image(i)
        outputs = []
        for idx in grid.batches(run.sub_batch_size):
            outputs.append(_global2local_step(run.model, image, label, grid, idx, context, run.losses,
                                              run.micro_batch_size))
            run.on_patches(len(idx))
        local_logits, ensemble_logits = (torch.cat(o) for o in zip(*outputs))
        images.append(ImageResult(glob.logits[i : i + 1], grid, local_logits, ensemble_logits))
    return images


def _run_local2global(run: _Run) -> list[ImageResult]:
    """Local features (with the frozen stage-1 global context) feed the global branch.

    The local branch is frozen here (eval mode, no gradients), so its passes are
    micro-batches whatever the sub-batch size. What the ensemble needs of each patch later:
    in evaluation the n_class-channel local term; in training the 512-channel ps3
    (ensemble_conv's local half learns from it), or, with activation checkpointing,
    nothing: the sub-batch's ps3 is recomputed when the ensemble needs it.
    """
    model, backward = run.model, run.losses.backward
    recompute = backward and model.activation_checkpointing
    with torch.no_grad():
        fixed, merged, kept, local_logits = _merge_local_features(run, recompute)
    glob = model.global_branch(run.batch.global_images, merged)
    del merged  # read by the global pass only
    run.losses.step(run.losses.focal(glob.logits, _global_targets(run.labels, glob)), retain_graph=True)
    last = (len(run.batch.images) - 1, len(run.grids[-1].batches(run.sub_batch_size)) - 1)
    images = []
    for i, (image, label, grid) in enumerate(zip(run.batch.images, run.labels, run.grids)):
        ensemble_logits = []
        for j, idx in enumerate(grid.batches(run.sub_batch_size)):
            if kept[i] is None:
                context = image_context(fixed, i)  # type: ignore[arg-type]
                term = model.ensemble_local_term(_local_ps3(model, image, grid, idx, context, run.micro_batch_size))
            else:
                rows = kept[i].tensor[idx.start : idx.stop]  # type: ignore[union-attr]
                term = model.ensemble_local_term(rows) if backward else rows
            ensemble, _ = model.ensemble(term, glob.ps3[i : i + 1], grid, idx)
            target = _patch_targets(label, grid, idx, ensemble.shape[-2:])
            run.losses.step(run.losses.focal(ensemble, target), retain_graph=(i, j) != last)
            ensemble_logits.append(ensemble.detach())
        images.append(ImageResult(glob.logits[i : i + 1].detach(), grid, local_logits[i], torch.cat(ensemble_logits)))
    return images


def _merge_local_features(
    run: _Run, recompute: bool
) -> tuple[Optional[Context], Context, list[Optional[_PerPatch]], list[Tensor]]:
    """Stage 3's first pass (the caller's no_grad: the canvases are added into in place): the
    frozen stage-1 maps if `recompute` will read them again, else None; the local features
    merged into whole-image maps (the global head's context); what the ensemble keeps of
    each patch (None where it recomputes); the local logits. Everything else made here, the
    frozen maps included when not returned (about 80 MB per 508 x 508 global image in
    fp32), is released before the global pass."""
    fixed = run.frozen_global.context_maps(run.batch.global_images)  # type: ignore[union-attr]
    merged, kept, local_logits = [], [], []
    for i, (image, grid) in enumerate(zip(run.batch.images, run.grids)):
        context = image_context(fixed, i)
        canvases = empty_canvases(context)
        terms = None if recompute else _PerPatch(len(grid))
        logits = _PerPatch(len(grid))
        _local2global_passes(run.model, image, grid, context, canvases, run.micro_batch_size, run.on_patches,
                             logits=logits, terms=terms, keep_ps3=run.losses.backward)
        merged.append(normalised_context(canvases, grid))
        del canvases  # channels-last maps were divided into maps of their own
        kept.append(terms)
        local_logits.append(logits.tensor)
    return (fixed if recompute else None), _cat_contexts(merged), kept, local_logits


_RUNNERS: dict[Stage, Callable[[_Run], list[ImageResult]]] = {
    Stage.GLOBAL: _run_global,
    Stage.GLOBAL2LOCAL: _run_global2local,
    Stage.LOCAL2GLOBAL: _run_local2global,
}


class _PerPatch:
    """One (n_patches, ...) tensor filled pass by pass: unlike torch.cat of the passes'
    results, it never holds them twice (stage 3 training keeps every patch's 512-channel
    ps3, over a gigabyte at 2448 x 2448)."""

    def __init__(self, n_patches: int) -> None:
        self.n_patches = n_patches
        self._tensor: Optional[Tensor] = None

    def write(self, idx: range, values: Tensor) -> None:
        if self._tensor is None:
            self._tensor = values.new_empty((self.n_patches, *values.shape[1:]))
        self._tensor[idx.start : idx.stop] = values

    @property
    def tensor(self) -> Tensor:
        if self._tensor is None:
            raise ValueError("no pass was written")
        return self._tensor


# The per-sub-batch steps are functions so that a sub-batch's activations are freed when
# it is done, not kept alive by loop variables while the next one runs.
def _global2local_step(
    model: GLNet,
    image: Tensor,
    label: Optional[Tensor],
    grid: PatchGrid,
    idx: range,
    context: BranchOutput,
    losses: Optional[_Losses],
    micro_batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Stage 2 on one sub-batch: local and ensemble logits; the loss is backpropagated
    (when training) before returning. losses: None where none are computed (no label).

    Only the backbone couples the patches of a sub-batch (BatchNorm statistics). The head,
    the crops and the losses (means over equally sized patches) do not, so they run
    micro_batch_size patches at a time: each micro-batch's share of the loss is
    backpropagated into the backbone maps at once, and the backbone's backward follows
    with the summed map gradients. Values and gradients are those of the whole sub-batch
    (up to float summation order), at a fraction of the head's activation memory.
    """
    c = model.local_features(_patches(image, grid, idx))
    losses = losses if label is not None else None
    backward = losses is not None and losses.backward
    head_in = tuple(t.detach().requires_grad_() for t in c) if backward else c
    n = len(idx)
    parts = [
        _global2local_head(model, head_in, rows, label, grid, idx, context, losses, len(rows) / n)
        for rows in chunks(n, micro_batch_size)
    ]
    local_logits, ensemble_logits, values = zip(*parts)
    if losses is not None:
        if backward:
            torch.autograd.backward(c, [t.grad for t in head_in])
        fmreg, focal_local, focal_ensemble, total = zip(*values)
        losses.record_parts(fmreg, [focal_local, focal_ensemble], total)
    return torch.cat(local_logits), torch.cat(ensemble_logits)


def _global2local_head(
    model: GLNet,
    c: Levels,
    rows: range,
    label: Optional[Tensor],
    grid: PatchGrid,
    idx: range,
    context: BranchOutput,
    losses: Optional[_Losses],
    share: float,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The head and losses of the micro-batch `rows` of a sub-batch whose backbone maps are
    c. Loss terms are weighted by the micro-batch's share of the sub-batch, so that they
    sum to the sub-batch's: (fmreg, focal local, focal ensemble, total); none without a
    label (losses None)."""
    part = idx[rows.start : rows.stop]
    maps = tuple(m[rows.start : rows.stop] for m in c)
    local = model.local_head(maps, context.context(), grid, part)  # type: ignore[arg-type]
    ensemble, crop = model.ensemble(model.ensemble_local_term(local.ps3), context.ps3, grid, part)
    target = _patch_targets(label, grid, part, local.logits.shape[-2:])
    if losses is None or target is None:
        return local.logits.detach(), ensemble.detach(), ()
    fmreg = share * fmreg_loss(local.ps3, crop)
    loss_local, loss_ens = share * focal_loss(local.logits, target), share * focal_loss(ensemble, target)
    total = loss_local + loss_ens + losses.lamb_fmreg * fmreg
    if losses.backward:
        total.backward()
    return local.logits.detach(), ensemble.detach(), tuple(t.detach() for t in (fmreg, loss_local, loss_ens, total))


def _local2global_pass(
    model: GLNet,
    image: Tensor,
    grid: PatchGrid,
    idx: range,
    context: Context,
    canvases: Canvases,
    logits: Optional[_PerPatch],
    terms: Optional[_PerPatch],
    keep_ps3: bool,
) -> None:
    """Stage 3's local pass on one micro-batch: its features are pasted into the canvases,
    its logits written to `logits` (unless None), and, unless `terms` is None, what the
    ensemble needs later: ps3 itself (keep_ps3, training) or its n_class-channel local term."""
    local = model.local_branch(_patches(image, grid, idx), context, grid, idx)
    paste_context(canvases, local.context(), grid, idx)
    if logits is not None:
        logits.write(idx, local.logits)
    if terms is not None:
        terms.write(idx, local.ps3 if keep_ps3 else model.ensemble_local_term(local.ps3))


def _local2global_passes(
    model: GLNet,
    image: Tensor,
    grid: PatchGrid,
    context: Context,
    canvases: Canvases,
    micro_batch_size: int,
    report: Callable[[int], None],
    *,
    start: int = 0,
    logits: Optional[_PerPatch] = None,
    terms: Optional[_PerPatch] = None,
    keep_ps3: bool = False,
    on_pass: Optional[KeepFirstPass] = None,
) -> None:
    """Stage 3's first pass: _local2global_pass over the patches from `start` (where a
    micro-batch begins) to the last, each micro-batch's patches reported; on_pass is told
    the canvases' buffers after each (buffers, patches added, patches of the grid)."""
    for idx in grid.batches(micro_batch_size):
        if idx.start < start:
            continue
        _local2global_pass(model, image, grid, idx, context, canvases, logits, terms, keep_ps3)
        report(len(idx))
        if on_pass is not None:
            on_pass(canvases.buffers, idx.stop, len(grid))


def _local_ps3(
    model: GLNet, image: Tensor, grid: PatchGrid, idx: range, context: Context, micro_batch_size: int
) -> Tensor:
    """Stage 3's frozen local ps3 of the patches idx, recomputed micro-batch by micro-batch
    (eval mode and no gradient, as in the first pass, so the values are the same)."""
    ps3 = _PerPatch(len(idx))
    with torch.no_grad():
        for rows in chunks(len(idx), micro_batch_size):
            part = idx[rows.start : rows.stop]
            ps3.write(rows, model.local_branch(_patches(image, grid, part), context, grid, part).ps3)
    return ps3.tensor


def row_patches(grid: PatchGrid, row: int, micro_batch_size: int) -> list[range]:
    """The patch indices of one grid row, in passes of at most micro_batch_size patches."""
    first = row * grid.n_cols
    return [range(first + r.start, first + r.stop) for r in chunks(grid.n_cols, micro_batch_size)]


@torch.inference_mode()
def stream_patch_logits(
    stage: Stage,
    model: GLNet,
    image: Tensor,
    global_image: Tensor,
    grid: PatchGrid,
    *,
    frozen_global: Optional[GlobalBranch] = None,
    micro_batch_size: int = 1,
    start_row: int = 0,
    on_patches: Optional[Callable[[int], None]] = None,
    first_pass: Optional[FirstPass] = None,
    on_first_pass: Optional[KeepFirstPass] = None,
) -> Iterator[tuple[int, Tensor]]:
    """The final per-patch prediction of stage 2 or 3 (the ensemble logits) of one image,
    grid row by grid row: (row, logits (n_cols, K, h, w)) for rows start_row.. in order.

    Inference only (every branch in eval mode, the caller's). `image` is anything with
    `.shape` (3, H, W) whose slices `image[..., top:bottom, left:right]` are uint8 (or unit
    float) tensors on the model's device: a tensor, or a lazy view of a file read region by
    region. global_image: (1, 3, Hg, Wg). Nothing is kept per patch beyond the row being
    yielded: stage 2 runs the global branch once, then the local branch and the ensemble
    row by row; stage 3 runs its local pass over every patch first (whatever start_row),
    pasting features into the merged context without keeping logits or terms, then the
    global branch, then recomputes each row's local ps3 (as run_stage does with activation
    checkpointing) for the ensemble. The values are run_stage's, up to float rounding where
    micro-batches group patches differently (run_stage's passes run across grid rows).
    on_patches: told the patches of each local pass done (stage 3 passes over its patches twice).
    Stage 3's first pass can be kept and resumed: on_first_pass(buffers, done, total) is told
    the canvases' buffers after each micro-batch of it (`done` of `total` patches added), and
    first_pass = (buffers, done) as told resumes it there, to the same sums (the same patches
    added in the same order); one that does not fit this image and grid is ignored.
    """
    if stage is Stage.GLOBAL:
        raise ValueError("stage 1 has no per-patch prediction: its global logits are the prediction")
    report = on_patches or (lambda n: None)
    if stage is Stage.GLOBAL2LOCAL:
        context = model.global_branch(global_image).image(0)
        for row in range(start_row, grid.n_rows):
            ensemble = []
            for idx in row_patches(grid, row, micro_batch_size):
                ensemble.append(_global2local_step(model, image, None, grid, idx, context, None, micro_batch_size)[1])
                report(len(idx))
            yield row, torch.cat(ensemble)
        return
    if frozen_global is None:
        raise ValueError("stage 3 needs the frozen stage-1 global branch")
    context = frozen_global.context_maps(global_image)
    canvases = empty_canvases(context)
    done = _resume_first_pass(canvases, first_pass, grid, micro_batch_size)
    del first_pass  # copied into the canvases: its memory goes back now, not after the image
    _local2global_passes(model, image, grid, context, canvases, micro_batch_size, report, start=done,
                         on_pass=on_first_pass)
    merged = normalised_context(canvases, grid)
    del canvases  # channels-last maps were divided into maps of their own
    glob = model.global_branch(global_image, merged)
    del merged
    for row in range(start_row, grid.n_rows):
        ensemble = []
        for idx in row_patches(grid, row, micro_batch_size):
            term = model.ensemble_local_term(_local_ps3(model, image, grid, idx, context, micro_batch_size))
            ensemble.append(model.ensemble(term, glob.ps3[:1], grid, idx)[0])
            report(len(idx))
        yield row, torch.cat(ensemble)


def _global_targets(labels: list[Optional[Tensor]], out: BranchOutput) -> Optional[Tensor]:
    if any(label is None for label in labels):
        return None
    return torch.stack([resize_labels(label, out.logits.shape[-2:]) for label in labels])  # type: ignore[arg-type]


def _cat_contexts(contexts: list[Context]) -> Context:
    if len(contexts) == 1:
        return contexts[0]
    return Context(*(tuple(torch.cat(maps) for maps in zip(*levels)) for levels in zip(*contexts)))  # type: ignore[arg-type]


def first_pass_fits(done: int, grid: PatchGrid, micro_batch_size: int) -> bool:
    """Whether a first pass kept after `done` patches can resume on this grid: a kept pass
    ends where a micro-batch of it ended (0: nothing kept)."""
    return done > 0 and done in {idx.stop for idx in grid.batches(micro_batch_size)}


def _resume_first_pass(canvases: Canvases, first_pass: Optional[FirstPass], grid: PatchGrid,
                       micro_batch_size: int) -> int:
    """Fill the canvases from a kept first pass that fits them; the patches it had added
    (0: start afresh)."""
    if first_pass is None or not first_pass_fits(first_pass[1], grid, micro_batch_size):
        return 0
    buffers, done = first_pass
    if len(buffers) != len(canvases.buffers) or any(
            saved.shape != ours.shape or saved.dtype != ours.dtype for saved, ours in zip(buffers, canvases.buffers)):
        return 0
    for saved, ours in zip(buffers, canvases.buffers):
        ours.copy_(saved)
    return done
