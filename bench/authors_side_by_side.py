"""Mode-3 evaluation of one image by the authors' code and by LUNGseg, as whole processes
taking turns on one machine: wall time, peak RSS and the per-class IoU each prints
(bench/README.md, Targets, 4). Their code is not in this repository; bring a clone of it:

    git clone https://github.com/VITA-Group/GLNet /path/to/GLNet      # where there is internet
    pip install opencv-python-headless                                # their one import beyond ours
    python bench/authors_side_by_side.py --authors /path/to/GLNet --rounds 3 --json out.jsonl

Their `train_deep_globe.py` runs as their `eval_deep_globe.sh` starts it, on the CPU with no GPU
visible: `.cuda()` becomes a no-op (their DataParallel passes straight through without a GPU)
and nothing else of theirs is changed. Both load the same rule-weight checkpoints (utils/weight_rule.py) and
score the same generated image, so equal IoUs show that both ran the same evaluation.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# Run as a script from anywhere, the repo's modules must still import.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402

from bench.bench_inference import Case, cli_command, run_logged, write_cli_inputs  # noqa: E402
from bench.records import add_output_flags, environment, reporter, reports_failed_commands, scratch_folder  # noqa: E402
from config import cpu_has_bf16, default_checkpoint  # noqa: E402
from models.stages import Stage  # noqa: E402

# Files a clone of their code has; check_authors looks for them.
AUTHORS_FILES = ("train_deep_globe.py", "helper.py", "models/fpn_global_local_fmreg_ensemble.py")
# Imported by their train_deep_globe.py whether or not it trains.
AUTHORS_IMPORTS = {"tensorboardX": "tensorboardX", "cv2": "opencv-python-headless", "tqdm": "tqdm"}
# Their ResNet constructor loads ImageNet weights through torch's model zoo, under this name.
IMAGENET_FILE = "resnet50-19c8e357.pth"
KINDS = {"ensemble": "val", "local": "Local val", "global": "Global val"}
# NumPy prints their IoUs to 8 decimals; ours, exact, may differ from that by half a unit.
PRINTED_HALF_UNIT = 5e-9

# Runs their train_deep_globe.py (the clone is argv[1]) with their own packages first on the
# path: ours (helper, models, dataset, utils) share their names.
_AUTHORS_PRELUDE = """
import os, runpy, sys
authors = sys.argv[1]
sys.path[:] = [authors] + [p for p in sys.path if p not in ("", os.getcwd())]
os.chdir(authors)
import torch
torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.nn.Module.cuda = lambda self, *args, **kwargs: self
sys.argv = [os.path.join(authors, "train_deep_globe.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def authors_code_id(authors: Path) -> dict:
    """The clone's commit when it is a git checkout of its own (not a copy inside another
    one), and a digest of all its Python files, which name the code without git."""
    digest = hashlib.sha256()
    for path in sorted(authors.rglob("*.py")):
        digest.update(str(path.relative_to(authors)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(authors), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") if Path(git("rev-parse", "--show-toplevel")) == authors else None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"authors_commit": commit, "authors_sha256": digest.hexdigest()[:16]}


def check_authors(authors: Path) -> None:
    missing = [name for name in AUTHORS_FILES if not (authors / name).is_file()]
    if missing:
        raise SystemExit(f"error: {authors} is not a clone of the authors' GLNet (no {', '.join(missing)}); "
                         "clone https://github.com/VITA-Group/GLNet and pass its folder as --authors")
    absent = [package for module, package in AUTHORS_IMPORTS.items() if importlib.util.find_spec(module) is None]
    if absent:
        raise SystemExit(f"error: the authors' code imports what is not installed: pip install {' '.join(absent)}")


def prepare_authors_inputs(data: Path, torch_home: Path) -> None:
    """What their evaluation needs beyond LUNGseg's: a train split that is not empty (their
    loop fetches its first batch before it breaks off for evaluation), an
    `offical_crossvali/Sat` folder (listed at start-up, spelled as theirs), and an ImageNet
    file where their model zoo looks (random values: their evaluation overwrites them, and
    the time to load them is the same)."""
    for folder in ("Sat", "Label"):
        shutil.copytree(data / "crossvali" / folder, data / "train" / folder, dirs_exist_ok=True)
    (data / "offical_crossvali" / "Sat").mkdir(parents=True, exist_ok=True)
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), hub / IMAGENET_FILE)


def authors_command(authors: Path, data: Path, models: Path, logs: Path, size_g: int, size_p: int) -> list[str]:
    """Their eval_deep_globe.sh, with this machine's paths."""
    return [sys.executable, "-c", _AUTHORS_PRELUDE, str(authors), "--n_class", "7", "--data_path", f"{data}/",
            "--model_path", f"{models}/", "--log_path", f"{logs}/", "--task_name", "eval", "--mode", "3",
            "--batch_size", "6", "--sub_batch_size", "6", "--size_g", str(size_g), "--size_p", str(size_p),
            "--path_g", default_checkpoint(Stage.GLOBAL), "--path_g2l", default_checkpoint(Stage.GLOBAL2LOCAL),
            "--path_l2g", default_checkpoint(Stage.LOCAL2GLOBAL), "--evaluation"]


def authors_iou(output: str) -> dict[str, list[float]]:
    """Per-class validation IoU of each kind, from the NumPy arrays their log prints
    (`val:[...]`, `Local val:[...]`, `Global val:[...]`, which may wrap over lines)."""
    iou = {}
    for kind, label in KINDS.items():
        found = re.search(rf"^{label}:\[([^\]]*)\]", output, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"the authors' output has no '{label}:[...]' line:\n{output[-3000:]}")
        iou[kind] = [float(value) for value in found.group(1).split()]
    return iou


def lungseg_iou(logs: Path) -> dict[str, list[float]]:
    """Per-class IoU of each kind from the evaluation's JSON file under `logs`."""
    files = sorted(logs.glob("*/eval-*.json"))
    if len(files) != 1:
        raise RuntimeError(f"expected one evaluation file under {logs}, found {len(files)}")
    scores = json.loads(files[0].read_text())["scores"]
    return {kind: scores[kind]["iou"] for kind in KINDS}


def same_iou(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Equal as far as NumPy prints them; a class in neither truth nor prediction is NaN in theirs."""
    def same(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or abs(x - y) <= PRINTED_HALF_UNIT * (1 + 1e-6)

    return all(len(a[k]) == len(b[k]) and all(same(x, y) for x, y in zip(a[k], b[k])) for k in KINDS)


def summary(records: list[dict]) -> list[dict]:
    """Per code and flags: median time and peak RSS, their ratios to the authors' medians,
    and whether every run's IoUs equal the authors' first run's."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["code"], r["flags"]), []).append(r)
    authors = groups[("authors", "")]
    base_s = statistics.median(r["seconds"] for r in authors)
    base_mb = statistics.median(r["peak_rss_mb"] for r in authors)
    rows = []
    for (code, flags), runs in groups.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        mb = statistics.median(r["peak_rss_mb"] for r in runs)
        rows.append({"summary": code, "flags": flags, "runs": len(runs), "median_seconds": round(seconds, 1),
                     "median_peak_rss_mb": round(mb), "time_vs_authors": round(seconds / base_s, 3),
                     "rss_vs_authors": round(mb / base_mb, 3),
                     "iou_equals_authors": all(same_iou(r["iou"], authors[0]["iou"]) for r in runs)})
    return rows


def report_run(report: Callable[[dict], None], round_: int, code: str, flags: str, seconds: float, peak: float,
               iou: dict[str, list[float]]) -> dict:
    """Report one run as soon as it is measured; the record."""
    record = {"round": round_, "code": code, "flags": flags, "seconds": round(seconds, 2), "peak_rss_mb": round(peak),
              "iou": iou}
    report(record)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--authors", type=Path, required=True, help="a clone of https://github.com/VITA-Group/GLNet")
    a("--size", type=int, default=2448, help="image side (default: 2448, DeepGlobe's)")
    a("--size_g", type=int, default=508, help="global image and patch size of both (default: 508, the authors')")
    a("--rounds", type=int, default=3, help="times each command runs, taking turns (default: 3)")
    a("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run (default: 2)")
    a("--lungseg_flags", action="append", default=None, metavar="FLAGS",
      help="train_deep_globe.py flags of one LUNGseg variant, quoted; repeat for more (default: none, the "
      "faithful fp32, and '--amp bf16 --channels_last' where the CPU has bf16 instructions)")
    add_output_flags(p)
    return p


@reports_failed_commands
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    authors = args.authors.resolve()
    check_authors(authors)
    variants = args.lungseg_flags or ([""] + (["--amp bf16 --channels_last"] if cpu_has_bf16() else []))
    report = reporter(args.json)
    report(environment("cpu", threads=args.threads, size=args.size, **authors_code_id(authors)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    records = []
    with scratch_folder(args.folder, "side_by_side_") as folder:
        data, models = write_cli_inputs(folder, args.size, "resnet50")
        prepare_authors_inputs(data, folder / "torch_home")
        size = (args.size_g, args.size_g)
        authors_env = {**env, "TORCH_HOME": str(folder / "torch_home"), "CUDA_VISIBLE_DEVICES": "",
                       "PYTHONDONTWRITEBYTECODE": "1"}  # their clone stays as it was
        for r in range(args.rounds):
            logs = folder / "runs" / str(r)
            (logs / "authors").mkdir(parents=True)  # their os.mkdir makes only the last folder
            cmd = authors_command(authors, data, models, logs / "authors", args.size_g, args.size_g)
            seconds, peak, output = run_logged(cmd, authors_env)
            records.append(report_run(report, r, "authors", "", seconds, peak, authors_iou(output)))
            for i, flags in enumerate(variants):
                ours = logs / f"lungseg{i}"
                case = Case(mode=3, size=args.size, size_g=size, size_p=size)
                seconds, peak, _ = run_logged(cli_command(case, data, models, ours) + shlex.split(flags), env)
                records.append(report_run(report, r, "lungseg", flags, seconds, peak, lungseg_iou(ours)))
    for row in summary(records):
        report(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
