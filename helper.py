"""Training and evaluation of GLNet's stages: model creation and loading per stage, the
optimizer and its schedule, one training epoch, evaluation and prediction (with optional
test-time augmentation). The stage logic itself lives in models/stages.py; the prediction
of images too large to hold, in band_prediction.py."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import Tensor

from dataset.classes import ClassTable
from dataset.transforms import global_image
from models.backbone import ResNetBackbone, fold_batchnorm
from models.compiled import compile_for_inference
from models.glnet import BRANCH_GROUPS, GLNet, GlobalBranch
from models.stages import CHECKPOINT_FLAGS, STAGES, Batch, ImageResult, Stage, StageResult, run_stage, set_branch_modes
from utils.checkpoint import CheckpointError, load_imagenet_backbones, load_weights, weights_digest
from utils.cuda_math import set_cuda_math
from utils.distributed import DistInfo, all_reduce_, average_gradients
from utils.images import class_dtype
from utils.memory import release_free_heap
from utils.metrics import ConfusionMatrix
from utils.optim import Adam041
from utils.patches import merge_argmax, merge_logits, upsample_argmax, upsample_nearest
from utils.progress import progress

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Compiling shows no progress of its own: said once, so a first image that takes minutes is
# not taken for a hang.
COMPILE_NOTE = ("--compile: the first image, and the first pass of each other size, compile the networks (minutes); "
                "later ones, and later runs through torch's compile cache, reuse them")
WEIGHT_DECAY = 5e-4
POLY_POWER = 0.9


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Session:
    """Everything a stage needs to run on batches: the networks and the configuration."""

    stage: Stage
    model: GLNet
    frozen_global: Optional[GlobalBranch]
    table: ClassTable
    size_g: tuple[int, int]
    size_p: tuple[int, int]
    sub_batch_size: int
    lamb_fmreg: float
    device: torch.device
    dist: DistInfo = DistInfo()
    amp: Optional[torch.dtype] = None  # autocast dtype (bf16, or fp16 on CUDA), None for fp32
    micro_batch_size: Optional[int] = None  # None: default_micro_batch_size
    on_patches: Optional[Callable[[int], None]] = None  # told the patches of each local pass done (progress)

    @property
    def predictions(self) -> tuple[str, ...]:
        return STAGES[self.stage].predictions

    @property
    def micro_batch(self) -> int:
        """Patches per pass wherever splitting a sub-batch does not change results."""
        return self.micro_batch_size or default_micro_batch_size(self.device, self.sub_batch_size)

    def after_pass(self, patches: int) -> None:
        """Told of each local pass done: the progress callback hears of it and, on the CPU,
        the pages the pass freed go back to the system (utils.memory.release_free_heap)."""
        if self.on_patches is not None:
            self.on_patches(patches)
        if self.device.type == "cpu":
            release_free_heap()

    def autocast(self) -> ContextManager:
        """The session's autocast (a context that does nothing in fp32)."""
        return torch.autocast(self.device.type, self.amp) if self.amp is not None else contextlib.nullcontext()

    def run(self, batch: Batch, backward: bool = False) -> StageResult:
        """backward=False is evaluation: the caller has put every branch in eval mode, where
        BatchNorm uses running statistics and patches are independent, so whole passes go
        micro-batch by micro-batch. Training keeps sub-batches for the backbone."""
        with self.autocast():
            return run_stage(
                self.stage,
                self.model,
                batch,
                patch_size=self.size_p,
                sub_batch_size=self.sub_batch_size if backward else self.micro_batch,
                frozen_global=self.frozen_global,
                lamb_fmreg=self.lamb_fmreg,
                backward=backward,
                micro_batch_size=self.micro_batch,
                # Training maps large blocks apart (utils.memory), so its heap holds little to trim.
                on_patches=self.on_patches if backward else self.after_pass,
            )


def default_micro_batch_size(device: torch.device, sub_batch_size: int) -> int:
    """Splitting only trades speed against memory. On the CPU one patch at a time was
    measured both faster and leaner than six (bench/README.md); a GPU wants batches."""
    return 1 if device.type == "cpu" else sub_batch_size


def checkpoint_path(model_path: str | Path, name: str) -> Path:
    """The authors' scripts name checkpoints relative to --model_path; absolute paths
    are taken as they are."""
    return Path(model_path) / name


def build_models(
    stage: Stage,
    n_class: int,
    *,
    training: bool,
    paths: dict[str, Optional[Path]],
    pretrained: Optional[Path] = None,
    backbone: str = "resnet50",
    device: torch.device | str = "cpu",
) -> tuple[GLNet, Optional[GlobalBranch]]:
    """The network for a stage, initialised as that stage prescribes (STAGES), and the
    frozen stage-1 global branch where the stage has one.

    paths: checkpoint files by flag name (`path_g`, `path_g2l`, `path_l2g`).
    pretrained: torchvision ImageNet weights for the backbones that the stage's training
    starts from ImageNet (stage 1: both, stage 2: the local one), loaded before the
    checkpoints are laid over the model, as the authors' code did; None leaves those
    backbones at random initialisation. Evaluation never reads it: every backbone it uses
    comes from a checkpoint.
    """
    spec = STAGES[stage]
    loads = spec.train_loads if training else spec.eval_loads
    model = GLNet(n_class, backbone)
    if training and pretrained is not None:
        load_imagenet_backbones(model, pretrained, spec.imagenet)
    for load in loads:
        load_weights(model, _required(paths, load.flag, stage, training), load.keys)
    frozen = None
    if spec.frozen_global is not None:
        frozen = GlobalBranch(n_class, backbone)
        load_weights(frozen, _required(paths, spec.frozen_global, stage, training), "global", reference=model)
        frozen.requires_grad_(False).eval().to(device)
    return model.to(device), frozen


def frozen_training_warning(model: GLNet, frozen: GlobalBranch, paths: dict[str, Optional[Path]]) -> Optional[str]:
    """Stage 3 training's line where its frozen global branch (from path_g) is not the
    global branch of the model it trains (from path_g2l). Stage 2 never changes its global
    branch, so a path_g2l trained from that path_g has the same tensors: no line."""
    ours = model.state_dict()
    differ = sum(not torch.equal(value, ours[key]) for key, value in frozen.state_dict().items())
    if not differ:
        return None
    return _frozen_note(paths["path_g"], f"--path_g2l {paths['path_g2l']}",
                        f"{differ} of its global-branch tensors differ", "stage 2")


# The facts' record of stage 3's frozen global branch (utils.checkpoint.weights_digest).
FROZEN_DIGEST = "frozen_global_sha256"


def frozen_digest(frozen: Optional[GlobalBranch]) -> Optional[str]:
    """The digest of stage 3's frozen global branch as loaded (before an inference session
    folds its BatchNorm), None for the stages without one."""
    return weights_digest(frozen.state_dict()) if frozen is not None else None


def frozen_context_warning(facts: dict[str, dict[str, Any]], digest: Optional[str],
                           paths: dict[str, Optional[Path]]) -> Optional[str]:
    """Evaluation's and prediction's line where --path_g is not the stage-1 file whose
    global branch stage 3 was trained with, as the facts of --path_l2g record it (facts:
    by flag, as config.Settled holds them; files without the record: no line)."""
    l2g_facts = facts.get("path_l2g", {})
    recorded = l2g_facts.get(FROZEN_DIGEST)
    if digest is None or recorded is None or recorded == digest:
        return None
    trained = l2g_facts.get("initialised_from", {}).get("--path_g", "unknown")
    return _frozen_note(paths["path_g"], str(paths["path_l2g"]), f"{trained}, by its facts", "stage 3")


def _frozen_note(path_g: Optional[Path], trained: str, evidence: str, stage: str) -> str:
    """One wording for both warnings: the file `trained` was trained with another --path_g
    (evidence: how that is known), and `stage` names the run whose --path_g to pass."""
    return (f"warning: --path_g {path_g} is not the stage-1 file that {trained} was trained with ({evidence}); stage 3 "
            f"takes its frozen context from --path_g, as the authors' code did: pass the --path_g {stage} used, unless "
            "this is meant")


def _produced_by(flag: str) -> str:
    stage = CHECKPOINT_FLAGS[flag]
    return f"stage {int(stage)} ({STAGES[stage].name})"


def require_checkpoints(stage: Stage, training: bool, paths: dict[str, Optional[Path]]) -> None:
    """Refuse, in one line, a run of `stage` whose checkpoint files are not named or not there."""
    for flag in STAGES[stage].reads(training):
        _required(paths, flag, stage, training)


def _required(paths: dict[str, Optional[Path]], flag: str, stage: Stage, training: bool) -> Path:
    path = paths.get(flag)
    what = "training" if training else "evaluating"
    if path is None:
        raise CheckpointError(
            f"{what} --mode {int(stage)} needs --{flag}, the checkpoint written by {_produced_by(flag)}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{path}: {'a folder, not a file' if path.is_dir() else 'not found'}; {what} --mode {int(stage)} "
            f"needs --{flag}, the checkpoint written by {_produced_by(flag)} (run that stage first, or fix the "
            "path; relative names are taken inside --model_path)"
        )
    return path


def use_channels_last(*nets: Optional[torch.nn.Module]) -> None:
    """Convert weights to channels-last (NHWC), which cuDNN convolves faster with tensor
    cores; activations follow the weights' format."""
    for net in nets:
        if net is not None:
            net.to(memory_format=torch.channels_last)


def store_for_inference(dtype: Optional[torch.dtype], *nets: Optional[torch.nn.Module]) -> None:
    """Prepare networks that only predict for autocast in dtype (None: fp32, left as they are).

    - BatchNorm is folded into the backbones' convolutions (`fold_batchnorm`): a kernel
      fewer per convolution. In fp32 that would change results in the last bits, which the
      fp32 path keeps equal to the authors'; autocast rounds far more.
    - Convolution weights are kept in dtype. Autocast runs convolutions in it whatever the
      weights are: it casts them on every call and, for the trainable ones, caches the cast
      copy next to the fp32 original (half GLNet's fp32 size again, on the GPU). Stored cast,
      they take half the memory.
    """
    if dtype is None:
        return
    for net in nets:
        if net is None:
            continue
        for backbone in [m for m in net.modules() if isinstance(m, ResNetBackbone)]:
            fold_batchnorm(backbone)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(dtype)


def make_session(
    stage: Stage,
    model: GLNet,
    frozen_global: Optional[GlobalBranch],
    table: ClassTable,
    config: argparse.Namespace,
    device: torch.device,
    *,
    inference: bool,
    dist: DistInfo = DistInfo(),
) -> Session:
    """A session of the networks on `device`, configured by train_deep_globe.py's flags in
    `config` (size_g, size_p, sub_batch_size, lamb_fmreg, micro_batch_size, amp,
    channels_last, checkpointing, compile, cuda_math; the last is process-wide).

    inference=True is for networks that only predict: they go to eval mode and, under
    autocast, keep their convolution weights in its dtype with BatchNorm folded into them
    (store_for_inference). Training keeps fp32 weights and sets branch modes per epoch.
    """
    set_cuda_math(config.cuda_math)
    model.to(device)
    model.activation_checkpointing = config.checkpointing
    if frozen_global is not None:
        frozen_global.to(device).eval()
    if config.channels_last:
        use_channels_last(model, frozen_global)
    if config.compile and not inference:
        raise ValueError("compile applies to networks that only predict (inference=True)")
    amp = AMP_DTYPES.get(config.amp)
    session = Session(stage, model, frozen_global, table, tuple(config.size_g), tuple(config.size_p),
                      config.sub_batch_size, config.lamb_fmreg, device, dist, amp, config.micro_batch_size)
    if inference:
        set_branch_modes(model, stage, training=False)
        store_for_inference(amp, model, frozen_global)
        if config.compile:
            compile_for_inference(model, frozen_global, session.micro_batch)
    return session


def build_optimizer(model: GLNet, stage: Stage, lr: float) -> Adam041:
    """Adam, stepped as the authors' torch stepped it (utils.optim), with the five parameter
    groups in state-dict order; groups the stage does not train get lr 0, as in the authors'
    code."""
    trains = STAGES[stage].trains
    groups = [
        {"params": list(getattr(model, name).parameters()), "lr": lr if name in trains else 0.0, "name": name}
        for name in BRANCH_GROUPS
    ]
    return Adam041(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def poly_schedule(optimizer: torch.optim.Optimizer, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base * (1 - T / N) ** 0.9 at iteration T (step it after every optimizer step);
    groups whose base lr is 0 stay at 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / max(1, total_iters)) ** POLY_POWER
    )


def to_batch(samples: dict[str, list[Any]], device: torch.device, with_labels: bool = True) -> Batch:
    """Move a collated batch to the device (images keep their dtype; the stage runner
    converts patches as it cuts them), with the global images (computed on the CPU by
    dataset.loader.GlobalInput) stacked."""
    labels = samples["label"]
    has_labels = with_labels and all(label is not None for label in labels)
    return Batch(
        images=[img.to(device, non_blocking=True) for img in samples["image"]],
        global_images=torch.stack(samples["global"]).to(device, non_blocking=True),
        labels=[label.to(device, non_blocking=True) for label in labels] if has_labels else None,
    )


def predictions_of(result: ImageResult, kinds: Sequence[str], size: Sequence[int]) -> dict[str, Tensor]:
    """Class maps (H, W) of one image for each of the given prediction kinds."""
    return {kind: _class_map(result, kind, size) for kind in kinds}


def _class_map(result: ImageResult, kind: str, size: Sequence[int]) -> Tensor:
    if kind == "global":
        return upsample_argmax(result.global_logits[0], size)
    return merge_argmax(result.patch_logits(kind), result.grid)  # type: ignore[arg-type]


def _summed_logits(result: ImageResult, kind: str, size: Sequence[int]) -> Tensor:
    """Full-resolution summed logits (K, H, W) of one kind; only test-time augmentation,
    which must map scores back before adding them, needs these."""
    if kind == "global":
        return upsample_nearest(result.global_logits[0], size)
    return merge_logits(result.patch_logits(kind), result.grid)  # type: ignore[arg-type]


# The eight dihedral transforms: k quarter turns, after an optional horizontal flip.
TTA_TRANSFORMS = [(k, flip) for k in range(4) for flip in (False, True)]


def _transform(x: Tensor, k: int, flip: bool) -> Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


def _untransform(x: Tensor, k: int, flip: bool) -> Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


@torch.inference_mode()
def predict(
    session: Session, samples: dict[str, list[Any]], tta: bool = False, kinds: Optional[Sequence[str]] = None
) -> list[dict[str, Tensor]]:
    """Class maps per image and prediction kind (default: every kind the stage has) for a
    collated batch, without autograd.

    With tta, the argmax is taken over `tta_scores`.
    """
    kinds = tuple(kinds or session.predictions)
    if tta:
        return [{kind: s.argmax(0).to(class_dtype(s.shape[0])) for kind, s in scores.items()}
                for scores in tta_scores(session, samples, kinds)]
    result = session.run(to_batch(samples, session.device, with_labels=False))
    return [predictions_of(r, kinds, img.shape[-2:]) for r, img in zip(result.images, samples["image"])]


def predict_image(session: Session, image: Tensor, tta: bool = False) -> Tensor:
    """The stage's final prediction (GLNet's ensemble; the global one in mode 1) for one
    image as read from disk, (3, H, W) uint8 (float in [0, 1] for deeper sources): (H, W)
    class ids (uint8 up to 256 classes) on the session's device. The image moves to the
    device first, so its global image is resized there."""
    image = image.to(session.device)
    samples = {"id": ["image"], "image": [image], "global": [global_image(image, session.size_g)], "label": [None]}
    final = session.predictions[-1]
    return predict(session, samples, tta, kinds=(final,))[0][final]


@torch.inference_mode()
def tta_scores(session: Session, samples: dict[str, list[Any]], kinds: Sequence[str]) -> list[dict[str, Tensor]]:
    """Test-time augmentation's summed logits (K, H, W) per image and kind: the whole method
    runs on each of the eight flips/rotations of the full image (global image and patches
    both cut from the transformed image), and its logits are mapped back and summed.
    Because every transform sees its own image, transforming the input transforms the
    result; the authors cut patches from the unrotated image, which broke that."""
    totals: list[dict[str, Tensor]] = [{} for _ in samples["image"]]
    for k, flip in TTA_TRANSFORMS:
        images = [_transform(img, k, flip) for img in samples["image"]]
        moved = {"image": images, "global": [global_image(img, session.size_g) for img in images],
                 "label": [None] * len(images)}
        result = session.run(to_batch(moved, session.device, with_labels=False))
        for total, r, img in zip(totals, result.images, images):
            for kind in kinds:
                back = _untransform(_summed_logits(r, kind, img.shape[-2:]), k, flip)
                total[kind] = total[kind] + back if kind in total else back
    return totals


@dataclass
class EpochStats:
    loss: float
    scores: dict[str, dict[str, Any]]


def _confusions(session: Session) -> dict[str, ConfusionMatrix]:
    return {kind: ConfusionMatrix(session.table.n_class) for kind in session.predictions}


def _scores(session: Session, confusions: dict[str, ConfusionMatrix]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind, conf in confusions.items():
        all_reduce_(conf.matrix, session.dist)
        out[kind] = {
            "iou": conf.iou(),
            "miou": conf.miou(session.table.ignore_in_metric),
            "pixels": int(conf.matrix.sum()),
        }
    return out


def train_one_epoch(
    session: Session,
    loader: Iterable[dict[str, list[Any]]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
) -> EpochStats:
    """One pass over the loader, one optimizer step per batch. Raises TrainingDiverged on
    a non-finite loss before stepping, so the weights stay those of the last good step."""
    set_branch_modes(session.model, session.stage, training=True)
    confusions = _confusions(session)
    params = list(session.model.parameters())
    total, count = 0.0, 0
    with progress(_length(loader), f"train {epoch + 1}", "batch", shown=session.dist.is_main) as bar:
        for i, samples in enumerate(loader):
            batch = to_batch(samples, session.device)
            optimizer.zero_grad(set_to_none=True)
            result = session.run(batch, backward=True)
            loss = all_reduce_(torch.tensor([result.loss], dtype=torch.float64, device=session.device), session.dist)
            loss_value = loss.item() / session.dist.world_size
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at epoch {epoch + 1}, batch {i + 1}; stopped before the optimizer "
                    "step, checkpoints from earlier epochs are untouched (try a lower --lr)"
                )
            average_gradients(params, session.dist)
            optimizer.step()
            scheduler.step()
            total, count = total + loss_value, count + 1
            with torch.no_grad():
                for r, image, label in zip(result.images, batch.images, batch.labels or []):
                    for kind, pred in predictions_of(r, session.predictions, image.shape[-2:]).items():
                        confusions[kind].update(pred, label)
            miou = confusions[session.predictions[-1]].miou(session.table.ignore_in_metric)
            bar.set_postfix(loss=f"{total / count:.4f}", miou=f"{miou:.3f}")
            bar.update()
    return EpochStats(total / max(1, count), _scores(session, confusions))


def evaluate(
    session: Session,
    loader: Iterable[dict[str, list[Any]]],
    *,
    tta: bool = False,
    on_prediction: Optional[Callable[[str, dict[str, Tensor]], None]] = None,
    desc: str = "eval",
) -> dict[str, dict[str, Any]]:
    """Scores of every prediction kind over the loader's labelled images (summed over
    ranks): {kind: {"iou": per-class list, "miou": float, "pixels": labelled pixels
    scored}}. `on_prediction(id, preds)` is called for every image, e.g. to save it."""
    set_branch_modes(session.model, session.stage, training=False)
    confusions = _confusions(session)
    main_kind = session.predictions[-1]
    with progress(_length(loader), desc, "batch", shown=session.dist.is_main) as bar, torch.inference_mode():
        for samples in loader:
            for sample_id, label, preds in zip(samples["id"], samples["label"], predict(session, samples, tta)):
                if label is not None:
                    label = label.to(session.device)
                    for kind, pred in preds.items():
                        confusions[kind].update(pred, label)
                if on_prediction is not None:
                    on_prediction(sample_id, preds)
            if bool(confusions[main_kind].matrix.any()):  # a split without masks has no score to show
                bar.set_postfix(miou=f"{confusions[main_kind].miou(session.table.ignore_in_metric):.3f}")
            bar.update()
    return _scores(session, confusions)


def _length(loader: Iterable[Any]) -> Optional[int]:
    return len(loader) if isinstance(loader, Sized) else None


def code_version() -> str:
    """This checkout's commit (git describe, "-dirty" when files differ from it), or
    "unknown" outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=30, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment_summary(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"torch {torch.__version__} on {name}"
