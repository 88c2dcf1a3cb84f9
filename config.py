"""The flags of train_deep_globe.py and a run's set-up from them (checks, checkpoint facts,
class table), shared by the trainer, predict.py and bench/."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import helper
from dataset.classes import NAMED_TABLES, ClassTable, load_class_table, table_from_json
from dataset.layouts import LAYOUTS, SPLITS
from dataset.segmentation import PRESETS
from models.backbone import BACKBONES
from models.stages import AUTHORS_SIZE, CHECKPOINT_FLAGS, LAMB_FMREG, STAGES, SUB_BATCH_SIZE, Stage, checkpoint_uses
from utils.checkpoint import CheckpointError, facts_path, read_facts
from utils.cores import usable_cores
from utils.cuda_math import CUDA_MATH
from utils.errors import DataError, OneLineParser
from utils.files import InUseError, WriteError
from utils.patches import MIN_OVERLAP


# ResNet's last stage is 1/32 of its input's side, rounded up. An input of at most 32 x 32
# px leaves it one value per channel, from which a BatchNorm layer in training cannot
# learn (torch refuses): a global batch of one image at that size, or the one patch of an
# image that small in stage 2, which trains the local ResNet.
RESNET_STRIDE = 32
ONE_VALUE = ("at 32 x 32 px or less the ResNet's last stage holds one value per channel, from which BatchNorm "
             "cannot learn")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively. Without it oneDNN emulates bf16, and
    autocast makes the CPU slower instead of faster."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86; other CPUs are not probed
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


class ConfigError(ValueError):
    """Flags that cannot work (together)."""


# Loader workers by default (default_workers): at most this many on CUDA; on the CPU these.
MAX_DEFAULT_WORKERS, CPU_WORKERS = 8, 2

USER_ERRORS = (DataError, CheckpointError, ConfigError, helper.TrainingDiverged, WriteError, InUseError)


def parse_size(text: str) -> tuple[int, int]:
    """'508' -> (508, 508); '512,1024' -> (512, 1024) as (H, W)."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use N or H,W") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use N or H,W")
    return (parts[0], parts[-1])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, off) and those the help text explains."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The trainer's flags; `description` heads its --help (the trainer passes its docstring)."""
    p = OneLineParser(description=description, formatter_class=_HelpFormatter)
    a = p.add_argument
    # The authors' flags, same meaning and defaults.
    a("--n_class", type=int, default=None, help="number of classes (default: from the class table; 7 for DeepGlobe)")
    a("--data_path", default="data/deep_globe", help="dataset root")
    a("--model_path", default="saved_models", help="folder for checkpoints; --path_* names are taken inside it")
    a("--log_path", default="runs", help="folder for tensorboard logs, log.txt and evaluation results")
    a("--task_name", default=None, help="run name: the checkpoint files' stem and the log folder's name (default: "
      "fpn_deepglobe_<global|global2local|local2global>)")
    a("--mode", type=int, choices=[1, 2, 3], default=1, help="1 global, 2 global-to-local, 3 local-to-global")
    a("--evaluation", action="store_true", help="evaluate instead of training")
    a("--batch_size", type=int, default=6, help="images per optimizer step (per process under torchrun)")
    a("--sub_batch_size", type=int, default=SUB_BATCH_SIZE, help="patches per forward pass of the local branch; in training they share BatchNorm statistics")
    a("--micro_batch_size", type=int, default=None, help="patches per pass wherever splitting a sub-batch does not "
      "change results: every pass in evaluation; in training, stage 2's FPN head and losses and stage 3's frozen "
      "local branch (only a training backbone's BatchNorm couples patches). Memory vs speed; default: 1 on the "
      "CPU (fastest and leanest there), --sub_batch_size on a GPU")
    add_size_flags(p)
    for flag, stage in CHECKPOINT_FLAGS.items():
        a(f"--{flag}", default=None, help=f"stage-{int(stage)} checkpoint (read by {checkpoint_uses(flag)})")
    a("--lamb_fmreg", type=float, default=LAMB_FMREG, help="weight of the feature-map regularisation (mode 2)")
    # Ours.
    a("--num_epochs", type=int, default=None, help="epochs to train (default per mode: 120, 50, 120)")
    a("--lr", type=float, default=None, help="Adam's learning rate, lowered per iteration by the poly schedule "
      "(power 0.9) (default per mode: 5e-5, 2e-5, 5e-5)")
    a("--num_workers", type=int, default=None, help="data loading processes; they change nothing but speed "
      "(default: on CUDA, the cores this process may use (affinity, container quota) less one, at most "
      f"{MAX_DEFAULT_WORKERS}, shared among --nproc_per_node processes; on the CPU {CPU_WORKERS}, as the network "
      "needs the cores)")
    a("--nproc_per_node", type=int, default=None, metavar="N", help="run in N processes on this machine, one per "
      "GPU, started by torchrun (see README, 'Several GPUs')")
    a("--seed", type=int, default=0, help="seed of data order and augmentation")
    a("--resume", action="store_true", help="continue the run from <model_path>/<task_name>.state.pth")
    a("--pretrained", default="auto", help="ImageNet weights for the backbones that training starts from ImageNet, "
      "as the authors' code does (mode 1: both, mode 2: the local one): a file, 'auto' (torchvision's cached "
      "IMAGENET1K_V1 file under ~/.cache/torch/hub/checkpoints; a V2 file only when named) or 'none' (random "
      "weights)")
    a("--tta", action="store_true", help="with --evaluation: test-time augmentation, 4 rotations x 2 flips")
    a("--save_predictions", default=None, metavar="DIR", help="write a colour PNG per evaluated image, "
      "DIR/<id>_mask.png")
    a("--test", action="store_true", help="evaluate the test split instead of crossvali (scored where it has labels)")
    a("--dataset", choices=["deep_globe", "folder"], default=None,
      help="data layout (see README; default: the checkpoint's, else deep_globe)")
    a("--classes", default=None, help="class table: a JSON file, or deep_globe / lung (default: the checkpoint's, "
      "else the dataset's own)")
    a("--mask_kind", choices=["ids", "colours"], default=None,
      help="masks hold class ids or class colours (default: the checkpoint's, else ids)")
    a("--backbone", choices=BACKBONES, default=None,
      help="resnet50 is GLNet; resnet18 only for quick experiments and tests (default: the checkpoint's, else resnet50)")
    add_device_flags(p)
    a("--checkpointing", action="store_true",
      help="activation checkpointing in training (ResNet stem, stages and blocks, the global FPN head; stage 3 "
      "recomputes the local ps3): less memory, some recomputation")
    return p


def add_size_flags(parser: argparse.ArgumentParser) -> None:
    """The global image's and the patches' sizes: flags the trainer and predict.py share."""
    a = parser.add_argument
    a("--size_g", type=parse_size, default=None, help="global image size: N or H,W, multiples of 4 (default: the "
      f"checkpoint's, else {AUTHORS_SIZE[0]})")
    a("--size_p", type=parse_size, default=None, help=f"local patch size: N or H,W, multiples of 4 above {MIN_OVERLAP} "
      f"(default: the checkpoint's, else {AUTHORS_SIZE[0]})")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Where and in what arithmetic the networks run: flags the trainer and predict.py share."""
    a = parser.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N (default: cuda "
      "when one is available, else cpu)")
    a("--amp", choices=sorted(helper.AMP_DTYPES), default=None, help="autocast: bf16 (training and "
      "evaluation; on the CPU only one with AVX512-BF16 or AMX instructions) or fp16 (evaluation on CUDA); "
      "BatchNorm is folded into the convolutions for inference. Faster, and results differ from fp32")
    a("--channels_last", action="store_true", help="channels-last memory format: faster convolutions on GPUs, and "
      "on CPUs once warmed up; results differ from the default's in the last bits")
    a("--compile", action="store_true", help="evaluation and prediction: compile the backbones and FPN heads with "
      "torch.compile (inductor), fusing the layers' glue into fewer kernels for the GPU. The first image of each "
      "size_g, size_p and patches per pass pays for compiling (minutes; later runs reuse torch's compile cache); "
      "results differ from the default's in the last bits. Needs Triton and a C compiler on CUDA, a C++ compiler on "
      "the CPU (where it gains nothing, and fp32 is slower)")
    add_cuda_math_flag(parser)


def add_cuda_math_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuda_math", choices=CUDA_MATH, default="strict",
        help="arithmetic on CUDA. strict: true fp32 (no TF32) and deterministic cuDNN algorithms (under --amp too), "
        "as the authors trained and evaluated; fast: TF32 tensor cores for fp32 convolutions and matrix products "
        "(about 1e-3 relative error) and any cuDNN algorithm, deterministic or not. No effect on the CPU")


# torchvision's IMAGENET1K_V1 files, which the authors' torchvision loaded: today's name, then
# the name of the same weights in torchvision before 0.13. IMAGENET1K_V2 (resnet50-11ad3fa6)
# came later, from another training recipe.
IMAGENET_V1_FILES = {"resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
                     "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth")}


def pretrained_path(args: argparse.Namespace) -> Optional[Path]:
    if args.pretrained == "none":
        return None
    if args.pretrained != "auto":
        return Path(args.pretrained)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    fetch = (f"on a machine with internet, python -c \"import torchvision; torchvision.models.{args.backbone}"
             f"(weights='IMAGENET1K_V1')\" and copy the file from {hub}")
    for name in IMAGENET_V1_FILES[args.backbone]:
        if (hub / name).is_file():
            return hub / name
    others = sorted(hub.glob(f"{args.backbone}-*.pth"))
    if others:
        raise CheckpointError(
            f"{others[0]}: not torchvision's IMAGENET1K_V1 {args.backbone} weights "
            f"({' or '.join(IMAGENET_V1_FILES[args.backbone])}), which the authors trained from: {fetch}; or pass "
            f"--pretrained {others[0]} to start from this file anyway"
        )
    raise CheckpointError(
        f"no ImageNet {args.backbone} weights in {hub} and no download is possible offline: {fetch}, or pass "
        "--pretrained PATH to that file, or --pretrained none to start from random weights"
    )


def default_workers(device: str) -> int:
    """Loader workers where --num_workers is not given. A GPU trains a batch faster than one
    worker loads it (about 0.1 s per 2448 x 2448 image, bench/README.md), so every core the
    process may use but its own loads (each worker holds two batches ahead, about 0.3 GB at
    DeepGlobe's size); on the CPU the network is the slow part."""
    if not device.startswith("cuda"):
        return CPU_WORKERS
    per_process = usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    return max(1, min(MAX_DEFAULT_WORKERS, per_process - 1))


def default_task_name(stage: Stage) -> str:
    """The authors' run names; a stage's checkpoint is <task name>.pth."""
    return f"fpn_deepglobe_{STAGES[stage].name}"


def parse_args(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """The trainer's flags, with the defaults of --mode filled in (task name, epochs, lr)."""
    args = build_parser(description).parse_args(argv)
    spec = STAGES[Stage(args.mode)]
    args.task_name = args.task_name or default_task_name(Stage(args.mode))
    args.num_epochs = spec.epochs if args.num_epochs is None else args.num_epochs
    args.lr = spec.lr if args.lr is None else args.lr
    args.num_workers = default_workers(args.device) if args.num_workers is None else args.num_workers
    return args


def check_args(args: argparse.Namespace, table: ClassTable) -> None:
    """Reject flag values that cannot work, with the fix."""
    problems = []
    for flag in ("size_g", "size_p"):
        for side in dict.fromkeys(getattr(args, flag)):  # one message for N, not one per side
            if side % 4:
                problems.append(f"--{flag} {side} must be a multiple of 4 (the network's output stride), e.g. 508")
    if min(args.size_g) < RESNET_STRIDE:
        problems.append(f"--size_g must be at least {RESNET_STRIDE} (ResNet's total stride)")
    elif not args.evaluation and max(args.size_g) <= RESNET_STRIDE:
        problems.append(f"--size_g must be larger than {RESNET_STRIDE} for training: {ONE_VALUE}")
    if min(args.size_p) <= MIN_OVERLAP:
        problems.append(f"--size_p must be larger than {MIN_OVERLAP} (neighbouring patches overlap by {MIN_OVERLAP} px)")
    for flag in ("batch_size", "sub_batch_size", "num_epochs", "micro_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        problems.append("--num_workers cannot be negative")
    elif args.num_workers > (most := 4 * usable_cores()):
        problems.append(f"--num_workers {args.num_workers} is more than 4 per core this process may use ({most}): "
                        "each is a process holding batches in memory, and more than the cores only wait their turn")
    if not 0 < args.lr < math.inf:
        problems.append(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.lamb_fmreg < math.inf:
        problems.append(f"--lamb_fmreg must be a number of at least 0, got {args.lamb_fmreg}")
    if not args.task_name or args.task_name in (".", "..") or any(sep in args.task_name for sep in "/\\"):
        problems.append(f"--task_name {args.task_name!r}: it names files and a folder, so it cannot be empty, . or .., "
                        "nor hold / or \\")
    if args.save_predictions is not None and (held := _data_folder_holding(Path(args.save_predictions), args)):
        problems.append(f"--save_predictions {args.save_predictions} is inside {held}, a folder of the data: the "
                        "predictions (<id>_mask.png) would replace or join its files; write them elsewhere")
    if not 0 <= args.seed < 2**32:
        problems.append(f"--seed must be in 0..2**32-1, got {args.seed}")
    if args.n_class is not None and args.n_class != table.n_class:
        problems.append(f"--n_class {args.n_class} does not match the class table ({table.n_class} classes)")
    if args.resume and args.evaluation:
        problems.append("--resume continues training; it cannot be combined with --evaluation")
    if args.test and not args.evaluation:
        problems.append("--test selects the split to evaluate; add --evaluation")
    if not args.evaluation:
        problems += [f"--{flag} applies to --evaluation; add it, or drop --{flag}"
                     for flag in ("tta", "save_predictions", "compile") if getattr(args, flag)]
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        problems.append(f"--device {args.device}: only cpu and cuda are supported")
    elif device.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.amp == "fp16" and device.type == "cpu":
        problems.append("--amp fp16 needs a CUDA device, got --device cpu; on the CPU use --amp bf16 or drop --amp")
    elif args.amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        problems.append("--amp bf16 on this CPU: it has no bf16 instructions (AVX512-BF16 or AMX), on which bf16 "
                        "runs slower than fp32; drop --amp")
    if args.compile and device.type in ("cpu", "cuda") and (missing := missing_compile_toolchain(device)):
        problems.append(f"--compile on {device.type.upper()} needs {missing} and none was found; install it or drop "
                        "--compile")
    if args.amp == "fp16" and not args.evaluation:
        problems.append("--amp fp16 is for evaluation; train with --amp bf16 (it needs no loss scaling)")
    if problems:
        raise ConfigError("; ".join(problems))


def _data_folder_holding(folder: Path, args: argparse.Namespace) -> Optional[Path]:
    """The image or mask folder of a split of --data_path that holds `folder`, if one does."""
    layout = LAYOUTS[args.dataset]
    inside = folder.resolve()
    candidates = (Path(args.data_path) / split / sub for split in SPLITS for sub in (layout.image_dir, layout.mask_dir))
    return next((c for c in candidates if inside.is_relative_to(c.resolve())), None)


def missing_compile_toolchain(device: torch.device) -> Optional[str]:
    """What torch.compile would lack to build kernels for the device, or None: on the CPU
    inductor's C++ compiler, on CUDA Triton and the C compiler Triton builds its launchers
    with (it takes $CC, else gcc, else clang)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton (the triton package of the torch build)"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "a C compiler for Triton (gcc or clang, or the one $CC names)"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler  # only for --compile: it imports inductor

    try:
        get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, or whatever a broken toolchain raises
        return "a C++ compiler (g++, or the one $CXX names)"
    return None


def checkpoint_paths(args: argparse.Namespace) -> dict[str, Optional[Path]]:
    return {f: helper.checkpoint_path(args.model_path, getattr(args, f)) if getattr(args, f) else None
            for f in CHECKPOINT_FLAGS}


# Flags whose value a run takes from its checkpoint's facts when not given, and otherwise
# the authors' value; the class table (--classes) is taken the same way.
FROM_FACTS = {"size_g": AUTHORS_SIZE, "size_p": AUTHORS_SIZE, "backbone": "resnet50", "dataset": "deep_globe",
              "mask_kind": "ids"}


@dataclass(frozen=True)
class Settled:
    """A run's class table, the facts of the checkpoints it reads (by flag, the file it
    starts from first), and one line per flag whose value differs from a checkpoint's."""

    table: ClassTable
    facts: dict[str, dict[str, Any]]
    notes: list[str]


def settle_flags(args: argparse.Namespace) -> Settled:
    """Fill the flags left out (FROM_FACTS, --classes) from the facts of the checkpoints the
    run reads, and refuse, in one line, a missing checkpoint, one of another stage or
    backbone, or of another class table (in evaluation: another class count). Files
    without facts leave the authors' defaults."""
    stage = Stage(args.mode)
    paths = checkpoint_paths(args)
    # A missing file first: without its facts, the run would ask for what they hold.
    helper.require_checkpoints(stage, not args.evaluation, paths)
    facts = {flag: found for flag in STAGES[stage].reads(not args.evaluation)
             if (found := read_facts(paths[flag])) is not None}  # type: ignore[arg-type]
    for flag, found in facts.items():
        if found.get("stage") != int(CHECKPOINT_FLAGS[flag]):
            wanted = CHECKPOINT_FLAGS[flag]
            raise CheckpointError(f"{paths[flag]}: a stage-{found.get('stage')} checkpoint, but --{flag} takes a "
                                  f"stage-{int(wanted)} ({STAGES[wanted].name}) one; pass the file that stage wrote")
    source = next(iter(facts), None)  # the flag of the file the run starts from
    notes = []
    for flag, default in FROM_FACTS.items():
        # The data layout flags are kept under "data".
        known = _as_flag(facts[source].get(flag, facts[source].get("data", {}).get(flag))) if source else None
        given = getattr(args, flag)
        if given is None:
            setattr(args, flag, known if known is not None else default)
        elif known is not None and given != known:
            if flag == "backbone":  # the weights fit only their own architecture
                raise ConfigError(f"--backbone {given}: {paths[source]} was trained with {known}; drop --backbone")
            notes.append(f"note: --{flag} {_shown(given)} is used; {paths[source]} was trained with {_shown(known)}")
    table = load_table(args, facts, paths, notes)
    return Settled(table, facts, notes)


def _as_flag(value: Any) -> Any:
    """A flag's value as the parser gives it (sizes are tuples, JSON has lists)."""
    return tuple(value) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    """A value as the command line writes it: a size N,N as N."""
    if isinstance(value, tuple):
        return ",".join(map(str, dict.fromkeys(value)))
    return str(value)


def load_table(args: argparse.Namespace, facts: dict[str, dict[str, Any]], paths: dict[str, Optional[Path]],
               notes: list[str]) -> ClassTable:
    """--classes, else the class table of the checkpoint the run starts from, else the
    dataset's own. A table other than a checkpoint's is refused in training (the weights
    learnt other classes) and noted in evaluation."""
    known = {flag: table_from_json(found["class_table"], facts_path(paths[flag]))  # type: ignore[arg-type]
             for flag, found in facts.items() if "class_table" in found}
    if args.classes in NAMED_TABLES:
        table = NAMED_TABLES[args.classes]
    elif args.classes:
        table = load_class_table(args.classes)
    elif known:
        table = next(iter(known.values()))
    elif (table := PRESETS[args.dataset].table) is None:
        raise ConfigError(f"--dataset {args.dataset} needs --classes, a class table JSON (see README, 'Your own data')")
    for flag, theirs in known.items():
        if theirs != table:
            if not args.evaluation or theirs.n_class != table.n_class:
                raise ConfigError(
                    f"{paths[flag]} was trained for the classes {', '.join(theirs.names)}, this run has "
                    f"{', '.join(table.names)}: drop --classes, or use a file trained with this class table (--{flag})"
                )
            notes.append(f"note: the class table {', '.join(table.names)} is used; {paths[flag]} was trained with "
                         f"classes {', '.join(theirs.names)}")
    return table


def default_checkpoint(stage: Stage) -> str:
    """The file training writes for a stage under its default task name."""
    return default_task_name(stage) + ".pth"
