"""Peak memory and time of predict.py on a synthetic very large image, end to end:
reading by regions, the global image, the network, the class map written band by band.

    python bench/predict_large_rss.py --sizes 20000 40000 --mode 1
    python bench/predict_large_rss.py --sizes 1024x20000 1024x40000 --mode 3 --backbone resnet18

Per size (H x W, or N for N x N):
  1. write a synthetic RGB tiled TIFF (bench/large_io_rss.make_tiff: 512-pixel tiles,
     deflate, made band by band) with its halvings as SubIFD levels down to under 2048 px
     a side (--levels to choose), and the stage checkpoints with deterministic random
     weights (utils/weight_rule.py) under their default names;
  2. run `predict.py --mode M --input IMAGE --output DIR` as a whole process, started from
     bench_inference's launcher so that its peak RSS is its own (bench/README.md);
  3. print one JSON line, appended at once to --json: wall time, peak RSS (MiB, as
     bench_inference), the files' sizes (MB), the patches through the local branch over all
     its passes (mode 3 passes twice).
The files go to a temporary folder under --folder, deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.bench_inference import run_measured, write_rule_checkpoints  # noqa: E402
from bench.large_io_rss import make_tiff  # noqa: E402
from bench.records import add_output_flags, environment, reporter, reports_failed_commands, scratch_folder  # noqa: E402
from config import parse_size  # noqa: E402
from models.backbone import BACKBONES  # noqa: E402
from models.stages import Stage  # noqa: E402
from utils.patches import PatchGrid  # noqa: E402

# Levels are halved until the smallest is under this many pixels a side.
SMALLEST_LEVEL = 2048


def default_levels(height: int, width: int) -> int:
    """Halvings (each rounded up, as make_tiff's levels) until the longest side is under
    SMALLEST_LEVEL."""
    levels = 0
    while -(-max(height, width) // 2**levels) >= SMALLEST_LEVEL:
        levels += 1
    return levels


def predict_command(args: argparse.Namespace, image: Path, models: Path, out: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "predict.py"), "--mode", str(args.mode), "--input", str(image),
           "--output", str(out), "--model_path", str(models), "--backbone", args.backbone, "--device", args.device,
           "--size_g", str(args.size_g), "--size_p", str(args.size_p)]
    return cmd + (["--exact_global"] if args.exact_global else []) + list(args.predict_flags)


def bench(args: argparse.Namespace, size: tuple[int, int], folder: Path) -> dict:
    height, width = size
    levels = default_levels(height, width) if args.levels is None else args.levels
    image, models, out = folder / "synthetic.tif", folder / "models", folder / "out"
    start = time.perf_counter()
    make_tiff(image, height, width, levels)
    made = time.perf_counter() - start
    write_rule_checkpoints(models, args.backbone)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    seconds, peak = run_measured(predict_command(args, image, models, out), env)
    grid = PatchGrid.build(size, (args.size_p, args.size_p))
    passes = {Stage.GLOBAL: 0, Stage.GLOBAL2LOCAL: 1, Stage.LOCAL2GLOBAL: 2}[Stage(args.mode)]
    return {"size": [height, width], "mode": args.mode, "backbone": args.backbone, "device": args.device,
            "size_g": args.size_g, "size_p": args.size_p, "levels": levels, "exact_global": args.exact_global,
            "predict_flags": list(args.predict_flags), "patches": len(grid) * passes,
            "input_mb": round(image.stat().st_size / 1e6),
            "output_mb": round((out / "synthetic_ids.tif").stat().st_size / 1e6), "make_seconds": round(made, 1), "seconds": round(seconds, 1), "peak_rss_mb": round(peak)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--sizes", type=parse_size, nargs="+", default=[parse_size("8000")], help="image sizes: N or H,W / HxW "
      "(default: 8000)")
    a("--mode", type=int, choices=[1, 2, 3], default=3, help="stage predicting (default: 3)")
    a("--backbone", choices=BACKBONES, default="resnet50", help="network of the checkpoints written "
      "(default: resnet50, the authors')")
    a("--device", default="cpu", help="predict.py's --device (default: cpu)")
    a("--size_g", type=int, default=508, help="global image size (default: 508)")
    a("--size_p", type=int, default=508, help="patch size (default: 508)")
    a("--levels", type=int, default=None, help="pyramid levels below full resolution (default: halvings down to "
      f"under {SMALLEST_LEVEL} px a side; 0: none, so the global image streams full resolution)")
    a("--exact_global", action="store_true", help="pass --exact_global to predict.py")
    a("--threads", type=int, default=None, help="OMP_NUM_THREADS of predict.py (default: torch's, all cores)")
    add_output_flags(p)
    a("predict_flags", nargs="*", help="more predict.py flags, after --, e.g. -- --micro_batch_size 6 --amp bf16")
    return p


@reports_failed_commands
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = reporter(args.json)  # at once: a later size that fails keeps the hours measured before it
    report(environment(args.device, threads=args.threads))
    for size in args.sizes:
        with scratch_folder(args.folder, "predict_large_") as folder:
            report(bench(args, tuple(size), folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
