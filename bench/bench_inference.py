"""Time and peak memory of GLNet per mode and image size: evaluation of one image and,
with --train, one training step on one image. See bench/README.md for the protocol.

    python bench/bench_inference.py --sizes 2448 --modes 3 --device cpu --repeat 1 --json out.json
    python bench/bench_inference.py --via-cli --sizes 2448 --modes 3 --device cpu

Weights are deterministic random ones (utils/weight_rule.py), so no checkpoint is needed.
Every case runs in a fresh process, so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# Run as a script from anywhere, the repo's modules must still import.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import config  # noqa: E402
import helper  # noqa: E402
from config import default_checkpoint  # noqa: E402
from dataset.classes import DEEPGLOBE  # noqa: E402
from dataset.make_demo import make_deep_globe_demo  # noqa: E402
from dataset.transforms import global_image  # noqa: E402
from models.backbone import BACKBONES  # noqa: E402
from models.glnet import GLNet, GlobalBranch  # noqa: E402
from models.stages import (  # noqa: E402
    AUTHORS_SIZE, CHECKPOINT_FLAGS, LAMB_FMREG, STAGES, SUB_BATCH_SIZE, Batch, Stage, set_branch_modes,
)
from utils.checkpoint import save_weights  # noqa: E402
from utils.files import writing  # noqa: E402
from utils.memory import return_large_blocks_to_the_system  # noqa: E402
from utils.weight_rule import apply_rule_weights  # noqa: E402
from utils.patches import PatchGrid  # noqa: E402
from bench.gpu_memory import nvml_memory  # noqa: E402
from bench.op_count import KernelCount, OpCount, show_compiled_kernels  # noqa: E402
from bench.tensor_peak import TensorPeak, module_tensors  # noqa: E402

KINDS = ("eval", "train")
WEIGHT_SEED = 0
MB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One measurement: `kind` ("eval" or "train") of `mode` on a size x size image."""

    mode: int
    size: int
    kind: str = "eval"
    device: str = "cpu"
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    checkpointing: bool = False
    sub_batch_size: int = SUB_BATCH_SIZE
    lamb_fmreg: float = LAMB_FMREG
    micro_batch_size: Optional[int] = None  # None: the trainer's default for the device
    size_g: tuple[int, int] = AUTHORS_SIZE
    size_p: tuple[int, int] = AUTHORS_SIZE
    backbone: str = "resnet50"
    threads: Optional[int] = None
    repeat: int = 3
    profile: bool = False
    tensor_peak: bool = False
    count_ops: bool = False
    count_kernels: bool = False
    cudnn_benchmark: bool = False
    cuda_math: str = "strict"


@dataclass
class Record:
    """What a case measured. seconds: median over the timed runs of one image (eval) or
    one step (train); first_seconds: the warm-up run before them (with compile: compiling
    included, the first image's latency); peak_mb: the process's peak RSS on the CPU, peak
    allocated CUDA memory on a GPU; tensor_peak_mb (eval with --tensor_peak): peak bytes of
    live tensors, weights included, on any device (bench/tensor_peak.py); ops, view_ops (eval
    with --count_ops): operator calls per image, and how many of them only made views
    (bench/op_count.py); kernels, kernel_views, kernels_compiled (eval with --count_kernels):
    host calls per image that each stand for a kernel, eager or compiled, the views among
    them and those made inside compiled code (bench/op_count.KernelCount). On a GPU also:
    steady_peak_mb, the peak allocated over the timed runs alone (peak_mb includes the
    warm-up, where cuDNN's autotuner tries its workspaces); and, read right after the timed
    runs, reserved_mb (what torch's caching allocator holds) and NVML's figures
    (bench/gpu_memory.py): nvml_process_mb, as nvidia-smi and gpustat show it, CUDA context
    included (nvml_process_of: how this process was found), and nvml_device_mb, the device's
    whole use."""

    case: dict[str, Any]
    seconds: float
    runs: list[float]
    peak_mb: float
    peak_of: str
    patches: int
    environment: dict[str, Any] = field(default_factory=dict)
    first_seconds: Optional[float] = None
    tensor_peak_mb: Optional[float] = None
    ops: Optional[int] = None
    view_ops: Optional[int] = None
    kernels: Optional[int] = None
    kernel_views: Optional[int] = None
    kernels_compiled: Optional[int] = None
    steady_peak_mb: Optional[float] = None
    reserved_mb: Optional[float] = None
    nvml_process_mb: Optional[float] = None
    nvml_process_of: Optional[str] = None
    nvml_device_mb: Optional[float] = None

    @property
    def images_per_s(self) -> float:
        return 1.0 / self.seconds


def environment(device: torch.device, threads: Optional[int]) -> dict[str, Any]:
    return {
        "commit": helper.code_version(),
        "torch": torch.__version__,
        "device_name": helper.environment_summary(device),
        "threads": threads or torch.get_num_threads(),
        "machine": platform.machine(),
    }


def patch_count(case: Case) -> int:
    """Patches per image (0 in mode 1, which has no local branch)."""
    return 0 if case.mode == Stage.GLOBAL else len(PatchGrid.build((case.size, case.size), case.size_p))


def case_from_dict(data: dict[str, Any]) -> Case:
    """Inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
    return Case(**{**data, "size_g": tuple(data["size_g"]), "size_p": tuple(data["size_p"])})


def rule_session(case: Case) -> helper.Session:
    """A session of the case's stage with rule weights: realistic activations, no files."""
    stage = Stage(case.mode)
    model = GLNet(DEEPGLOBE.n_class, case.backbone)
    apply_rule_weights(model, WEIGHT_SEED)
    frozen = None
    if STAGES[stage].frozen_global is not None:
        frozen = GlobalBranch(DEEPGLOBE.n_class, case.backbone)
        apply_rule_weights(frozen, WEIGHT_SEED)
        frozen.requires_grad_(False)
    return helper.make_session(stage, model, frozen, DEEPGLOBE, argparse.Namespace(**asdict(case)),
                               torch.device(case.device), inference=case.kind == "eval")


def random_image(size: int, generator: torch.Generator) -> torch.Tensor:
    """(3, size, size) uint8, as images arrive from disk."""
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)


def eval_step(session: helper.Session, image: torch.Tensor) -> Callable[[], None]:
    """Segment the image as predict.py does, from the uint8 tensor to the class map."""
    return lambda: helper.predict_image(session, image)


def train_step(session: helper.Session, image: torch.Tensor, generator: torch.Generator) -> Callable[[], None]:
    """One optimizer step of the stage on the image with a random label map."""
    label = torch.randint(0, DEEPGLOBE.n_class, image.shape[-2:], generator=generator)
    image = image.to(session.device)
    batch = Batch(
        images=[image],
        global_images=global_image(image, session.size_g)[None],
        labels=[label.to(session.device)],
    )
    optimizer = helper.build_optimizer(session.model, session.stage, STAGES[session.stage].lr)
    set_branch_modes(session.model, session.stage, training=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        session.run(batch, backward=True)
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def print_profile(step: Callable[[], None], device: torch.device, rows: int = 15) -> None:
    """Top operators of one run by their own time, on stderr."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        timed(step, device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows), file=sys.stderr)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: Case) -> Record:
    """Measure a case in this process: one warm-up run, then the median of case.repeat runs.

    The CPU peak is this process's peak RSS, which only belongs to the case when the
    process ran nothing else (run_case_isolated).
    """
    if case.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {case.kind!r}")
    if case.threads:
        torch.set_num_threads(case.threads)
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(0)
    if case.count_kernels:
        show_compiled_kernels()  # before the warm-up compiles
    session = rule_session(case)
    image = random_image(case.size, generator)
    step = eval_step(session, image) if case.kind == "eval" else train_step(session, image, generator)
    on_cuda = device.type == "cuda"
    gpu: dict[str, Any] = {}
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first_seconds = timed(step, device)
    if on_cuda:
        warm_peak = torch.cuda.max_memory_allocated(device) / MB
        torch.cuda.reset_peak_memory_stats(device)
    runs = [timed(step, device) for _ in range(case.repeat)]
    # Read before the runs below (profile, tensor peak, counts), which are not the case's.
    if on_cuda:
        gpu = {"steady_peak_mb": torch.cuda.max_memory_allocated(device) / MB,
               "reserved_mb": torch.cuda.memory_reserved(device) / MB, **nvml_memory(device)}
        peak_mb = max(warm_peak, gpu["steady_peak_mb"])
    else:
        peak_mb = peak_rss_mb()
    if case.profile:
        print_profile(step, device)
    tensor_peak_mb = None
    if case.tensor_peak and case.kind == "eval":
        with TensorPeak() as tensors:
            tensors.track([*module_tensors(session.model, session.frozen_global), image])
            step()
        tensor_peak_mb = tensors.peak / MB
    counted: Optional[OpCount] = None
    if case.count_ops and case.kind == "eval":
        with OpCount() as counted:
            step()
    kernels: Optional[KernelCount] = None
    if case.count_kernels and case.kind == "eval":
        with KernelCount() as kernels:
            step()
    return Record(
        case=asdict(case),
        seconds=statistics.median(runs),
        runs=runs,
        peak_mb=peak_mb,
        peak_of="cuda allocated" if on_cuda else "process rss",
        patches=patch_count(case),
        environment=environment(device, case.threads),
        first_seconds=first_seconds,
        tensor_peak_mb=tensor_peak_mb,
        ops=None if counted is None else counted.calls,
        view_ops=None if counted is None else counted.views,
        kernels=None if kernels is None else kernels.calls,
        kernel_views=None if kernels is None else kernels.views,
        kernels_compiled=None if kernels is None else kernels.compiled,
        **gpu,
    )


def run_case_isolated(case: Case) -> Record:
    """run_case in a fresh Python process, so the peak memory is the case's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-case", json.dumps(asdict(case))]
    with tempfile.TemporaryFile("w+") as out:
        status = launch(cmd, dict(os.environ), stdout=out)["status"]
        if status != 0:
            raise RuntimeError(f"case {asdict(case)} failed with exit status {status} (its error is above)")
        out.seek(0)
        return record_from_json(out.read().strip().splitlines()[-1])


def record_from_json(text: str) -> Record:
    """The record a --one-case child printed (the case stays a dict, as in Record)."""
    data = json.loads(text)
    return Record(**{k: v for k, v in data.items() if k != "images_per_s"})


def record_to_json(record: Record) -> dict[str, Any]:
    return {**asdict(record), "images_per_s": record.images_per_s}


def write_rule_checkpoints(models: Path, backbone: str) -> None:
    """Rule-weight checkpoints under the default names of every stage, in `models`."""
    model = GLNet(DEEPGLOBE.n_class, backbone)
    apply_rule_weights(model, WEIGHT_SEED)
    for stage in Stage:
        save_weights(model, models / default_checkpoint(stage))


def write_cli_inputs(folder: Path, size: int, backbone: str) -> tuple[Path, Path]:
    """A one-image crossvali split in DeepGlobe's layout and rule-weight checkpoints under
    the default names of every stage: (data root, model folder)."""
    data, models = folder / "data", folder / "models"
    make_deep_globe_demo(data, n_train=0, n_val=1, n_test=0, size=size)
    write_rule_checkpoints(models, backbone)
    return data, models


def cli_command(case: Case, data: Path, models: Path, logs: Path) -> list[str]:
    """The evaluation command line of eval_deep_globe.sh, on the case's settings."""
    cmd = [sys.executable, str(ROOT / "train_deep_globe.py"), "--evaluation", "--mode", str(case.mode),
           "--data_path", str(data), "--model_path", str(models), "--log_path", str(logs),
           "--sub_batch_size", str(case.sub_batch_size), "--size_g", "{},{}".format(*case.size_g),
           "--size_p", "{},{}".format(*case.size_p), "--device", case.device, "--backbone", case.backbone,
           "--cuda_math", case.cuda_math]
    cmd += (["--amp", case.amp] if case.amp else []) + (["--channels_last"] if case.channels_last else [])
    cmd += ["--compile"] if case.compile else []
    if case.micro_batch_size is not None:
        cmd += ["--micro_batch_size", str(case.micro_batch_size)]
    for flag, stage in CHECKPOINT_FLAGS.items():
        cmd += [f"--{flag}", default_checkpoint(stage)]
    return cmd


# Runs the command given as arguments and writes its wall time and rusage peak RSS (KiB)
# to the file named first. Linux carries a process's high-water RSS over exec: a child
# started straight from this benchmark process would report at least this process's own
# peak (torch's import, or gigabytes after generating a large test image), and so would a
# --one-case child's own getrusage. Started from this small launcher, each reports its own.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
result = {"seconds": time.perf_counter() - start, "status": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}
open(sys.argv[1], "w").write(json.dumps(result))
"""


def launch(cmd: Sequence[str], env: dict[str, str], stdout: Any = None, stderr: Any = None) -> dict[str, Any]:
    """Run a command through _LAUNCHER: {"seconds", "status", "maxrss_kib"}."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        subprocess.run([sys.executable, "-c", _LAUNCHER, str(result_file), *cmd], stdout=stdout, stderr=stderr,
                       cwd=ROOT, env=env, check=False)
        return json.loads(result_file.read_text()) if result_file.exists() else {"status": "no result"}


def run_logged(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; its wall time (s), the peak RSS (MB) of its largest process and its
    output (stdout and stderr)."""
    with tempfile.TemporaryFile() as log:
        result = launch(cmd, env, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if result["status"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return result["seconds"], result["maxrss_kib"] / 1024, output


def run_measured(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command; its wall time (s) and the peak RSS (MB) of its largest process."""
    seconds, peak, _ = run_logged(cmd, env)
    return seconds, peak


def run_cli_case(case: Case, folder: Path) -> Record:
    """Evaluate a generated one-image dataset with train_deep_globe.py; the whole process
    counts: start-up, model loading, data loading and writing the metrics."""
    data, models = write_cli_inputs(folder / str(case.size), case.size, case.backbone)
    env = dict(os.environ)
    if case.threads:
        env["OMP_NUM_THREADS"] = str(case.threads)
    seconds, peak = run_measured(cli_command(case, data, models, folder / "runs"), env)
    return Record(
        case={**asdict(case), "kind": "cli-eval"},
        seconds=seconds,
        runs=[seconds],
        peak_mb=peak,
        peak_of="process rss",
        patches=patch_count(case),
        environment=environment(torch.device(case.device), case.threads),
    )


TABLE_HEADER = (f"{'mode':>4} {'size':>6} {'kind':>8} {'device':>7} {'amp':>5} {'s/image':>9} {'images/s':>9} "
                f"{'first s':>8} {'peak MB':>9} {'tensor MB':>9} {'ops':>7} {'kernels':>7}")


def _shown(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: Record) -> str:
    c = r.case
    return (
        f"{c['mode']:>4} {c['size']:>6} {c['kind']:>8} {c['device']:>7} {c['amp'] or '-':>5} "
        f"{r.seconds:>9.3f} {r.images_per_s:>9.3f} {_shown(r.first_seconds, '.1f'):>8} {r.peak_mb:>9.0f} "
        f"{_shown(r.tensor_peak_mb, '.0f'):>9} {_shown(r.ops):>7} {_shown(r.kernels):>7}"
    )


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--sizes", type=int_list, default=[2448, 5000, 8000], help="square image sides (default: 2448,5000,8000)")
    a("--modes", type=int_list, default=[1, 2, 3], help="stages to run (default: 1,2,3)")
    a("--train", action="store_true", help="also time one training step per mode and size")
    a("--via-cli", action="store_true", help="instead, time `train_deep_globe.py --evaluation` as a whole process "
      "on a generated one-image dataset")
    a("--repeat", type=int, default=3, help="timed runs per case after one warm-up; the median is reported (default: 3)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    a("--amp", choices=sorted(helper.AMP_DTYPES), default=None, help="autocast dtype; bf16 also on the CPU (in-process "
      "on any CPU, where with --tensor_peak it shows what a GPU would hold; --via-cli as the command line allows)")
    a("--channels_last", action="store_true", help="channels-last weights")
    a("--compile", action="store_true", help="torch.compile the networks (the warm-up run compiles; its time is "
      "first_seconds)")
    a("--checkpointing", action="store_true", help="activation checkpointing in training steps")
    a("--sub_batch_size", type=int, default=SUB_BATCH_SIZE, help=f"the trainer's --sub_batch_size (default: {SUB_BATCH_SIZE})")
    a("--micro_batch_size", type=int, default=None, help="the trainer's --micro_batch_size (default: its default, "
      "1 on the CPU and --sub_batch_size on a GPU)")
    a("--size_g", type=config.parse_size, default=AUTHORS_SIZE, help=f"global image size (default: {AUTHORS_SIZE[0]})")
    a("--size_p", type=config.parse_size, default=AUTHORS_SIZE, help=f"patch size (default: {AUTHORS_SIZE[0]})")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--backbone", choices=BACKBONES, default="resnet50", help="(default: resnet50)")
    a("--profile", action="store_true", help="print the top operators of one more run of each case")
    a("--cudnn_benchmark", action="store_true", help="let cuDNN time its algorithms for each new shape "
      "(torch.backends.cudnn.benchmark; the warm-up run pays for it)")
    a("--tensor_peak", action="store_true", help="one more evaluation run recording the peak bytes of live "
      "tensors, weights included (any device; slower)")
    a("--count_ops", action="store_true", help="one more evaluation run counting the operator calls per image "
      "(each costs host time on a GPU; any device; not with --compile)")
    a("--count_kernels", action="store_true", help="one more evaluation run counting, with the profiler, the host's "
      "calls per image that each stand for a kernel: ATen operators and inductor's kernels, so eager and --compile "
      "compare (the CPU only)")
    config.add_cuda_math_flag(p)
    a("--json", default=None, metavar="OUT", help="write every record to this JSON file")
    a("--one-case", default=None, help=argparse.SUPPRESS)
    return p


def cases_of(args: argparse.Namespace) -> list[Case]:
    kinds = ("eval", "train") if args.train and not args.via_cli else ("eval",)
    common = dict(device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                  checkpointing=args.checkpointing,
                  sub_batch_size=args.sub_batch_size, micro_batch_size=args.micro_batch_size,
                  size_g=args.size_g, size_p=args.size_p,
                  backbone=args.backbone, threads=args.threads, repeat=args.repeat, profile=args.profile,
                  tensor_peak=args.tensor_peak, count_ops=args.count_ops, count_kernels=args.count_kernels,
                  cudnn_benchmark=args.cudnn_benchmark,
                  cuda_math=args.cuda_math)
    return [Case(mode, size, kind, **common) for size in args.sizes for mode in args.modes for kind in kinds]


def check_args(args: argparse.Namespace) -> None:
    """The trainer's checks of the flags both have (sizes, batches, device), and the bench's own."""
    problems = []
    if not args.sizes or min(args.sizes) < 1:
        problems.append("--sizes takes positive image sides, e.g. 2448,5000")
    if not args.modes or not set(args.modes) <= {int(stage) for stage in Stage}:
        problems.append("--modes takes 1, 2 and 3, e.g. 1,3")
    if args.repeat < 1:
        problems.append("--repeat must be at least 1")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be at least 1")
    if args.compile and args.train:
        problems.append("--compile applies to evaluation; drop --train (training runs eager)")
    if args.compile and (args.tensor_peak or args.count_ops):
        # Both watch operators one by one (a dispatch mode), under which compiled code runs eager.
        problems.append("--tensor_peak and --count_ops would measure the eager networks; drop them with --compile "
                        "(--count_kernels counts compiled code)")
    if args.count_kernels and torch.device(args.device).type != "cpu":
        problems.append("--count_kernels counts on the CPU; on a GPU, --profile lists the kernels that ran")
    shared = ["--evaluation", "--device", args.device, "--sub_batch_size", str(args.sub_batch_size),
              "--size_g", "{},{}".format(*args.size_g), "--size_p", "{},{}".format(*args.size_p)]
    if args.micro_batch_size is not None:
        shared += ["--micro_batch_size", str(args.micro_batch_size)]
    shared += ["--compile"] if args.compile else []
    if args.amp == "fp16" and torch.device(args.device).type != "cuda":
        problems.append(f"--amp fp16 needs a CUDA device, got --device {args.device} (on the CPU the benchmark "
                        "takes --amp bf16)")
    elif args.via_cli and args.amp is not None:
        shared += ["--amp", args.amp]  # the command line's rule: bf16 on a CPU with bf16 instructions
    try:
        config.check_args(config.parse_args(shared), DEEPGLOBE)
    except config.ConfigError as error:
        problems.append(str(error))
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one_case is not None:
        case = case_from_dict(json.loads(args.one_case))
        if case.kind == "train":
            return_large_blocks_to_the_system()  # as train_deep_globe.py does when training
        print(json.dumps(record_to_json(run_case(case))))
        return 0
    check_args(args)
    records: list[Record] = []
    print(TABLE_HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="glnet_bench_") as folder:
        for case in cases_of(args):
            print(f"running {case.kind} mode {case.mode} size {case.size} ...", file=sys.stderr, flush=True)
            records.append(run_cli_case(case, Path(folder)) if args.via_cli else run_case_isolated(case))
            # Row by row, and the JSON rewritten after each case: long runs keep what they measured.
            print(format_row(records[-1]), flush=True)
            if args.json:
                with writing(args.json) as file:
                    file.write(json.dumps([record_to_json(r) for r in records], indent=2).encode())
    if records:
        print(f"({records[0].environment['device_name']}, peak: {records[0].peak_of})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
