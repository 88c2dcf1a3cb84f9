"""Images per second of predict.py over a folder of JPEGs, files in to files out (target 2
of bench/README.md: at least 80 % of bench_inference's in-process figure on the same GPU).

    python bench/predict_folder.py --device cuda -- --amp bf16 --cuda_math fast --channels_last
    python bench/predict_folder.py --host_only     # what the host alone sustains, no network

1. writes --count land-cover JPEGs of --size pixels a side (bench/records.make_demo_copies:
   a few made by dataset/make_demo.py, copied under new names) and the stage checkpoints
   with deterministic random weights (utils/weight_rule.py);
2. times, in this process, what predict.py does around the network: reading each JPEG and
   writing both PNGs of each on one core, image after image; then both together with the
   threads predict.py uses on --device (dataset/prediction_files.host_threads), as predict.py
   runs them. The image's true class map stands in for the network's, so the PNGs compress as
   real predictions do. This rate is the most the host lets the GPU reach;
3. unless --host_only, runs `predict.py --mode M --input FOLDER --output DIR` as a whole
   process (bench_inference's launcher) on the first --warm images, then on all of them. The marginal rate
   (count - warm) / (T_all - T_warm) leaves out what both runs share: start-up, loading the
   checkpoints and the first images' warm-up (cuDNN's choices, the allocator's growth);
4. prints one JSON line, appended at once to --json: the host's images/s, both wall times,
   the marginal images/s, the full run's peak RSS (MiB).
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

import torch  # noqa: E402

from bench.bench_inference import run_measured, write_rule_checkpoints  # noqa: E402
from bench.records import (add_output_flags, environment, make_demo_copies, reporter,  # noqa: E402
                           reports_failed_commands, scratch_folder)
from dataset.classes import DEEPGLOBE  # noqa: E402
from dataset.io import read_image, read_mask  # noqa: E402
from dataset.layouts import DEEP_GLOBE, Sample  # noqa: E402
from dataset.prediction_files import HostThreads, host_threads, segment_files, write_prediction  # noqa: E402
from models.backbone import BACKBONES  # noqa: E402


def predict_command(args: argparse.Namespace, images: Path, models: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "predict.py"), "--mode", str(args.mode), "--input", str(images), "--output",
            str(out), "--model_path", str(models), "--backbone", args.backbone, "--device", args.device,
            *args.predict_flags]


def host_only(args: argparse.Namespace, samples: list[Sample], out: Path) -> dict:
    truth = {sample.image: read_mask(sample.mask, DEEPGLOBE, "ids") for sample in samples}
    threads = HostThreads(read=args.read_threads, write=args.write_threads) \
        if args.read_threads is not None else host_threads(torch.device(args.device))
    out.mkdir()
    # One core's cost of each side, image after image, then the pipeline with its threads.
    start = time.perf_counter()
    for sample in samples:
        read_image(sample.image)
    read_seconds = time.perf_counter() - start
    for sample in samples:
        write_prediction(truth[sample.image], DEEPGLOBE, out, sample.id)
    write_seconds = time.perf_counter() - start - read_seconds
    start = time.perf_counter()
    segment_files([sample.image for sample in samples], lambda path, image: truth[path], DEEPGLOBE, out,
                          threads, alone=False)
    seconds = time.perf_counter() - start
    return {"read_s_per_image": round(read_seconds / len(samples), 4),
            "write_s_per_image": round(write_seconds / len(samples), 4), "read_threads": threads.read,
            "write_threads": threads.write, "host_seconds": round(seconds, 3),
            "host_images_per_second": round(len(samples) / seconds, 3)}


def through_predict(args: argparse.Namespace, samples: list[Sample], folder: Path) -> dict:
    models = folder / "models"
    write_rule_checkpoints(models, args.backbone)
    warm = folder / "warm"
    warm.mkdir()
    for sample in samples[: args.warm]:
        os.symlink(sample.image, warm / sample.image.name)
    env = dict(os.environ)
    warm_seconds, _ = run_measured(predict_command(args, warm, models, folder / "out_warm"), env)
    seconds, peak = run_measured(predict_command(args, samples[0].image.parent, models, folder / "out"), env)
    if seconds <= warm_seconds:
        raise RuntimeError(f"{len(samples)} images took {seconds:.2f} s and the first {args.warm} {warm_seconds:.2f} s: "
                           "start-up varies more than the images take; raise --count")
    return {"warm": args.warm, "warm_seconds": round(warm_seconds, 2), "seconds": round(seconds, 2),
            "images_per_second": round((len(samples) - args.warm) / (seconds - warm_seconds), 3),
            "peak_rss_mb": round(peak)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--count", type=int, default=124, help="images in the folder (default: 124, so that the difference of the "
      "two runs is seconds even at 30 images/s)")
    a("--warm", type=int, default=4, help="images of the first run, whose time is subtracted (default: 4)")
    a("--size", type=int, default=2448, help="image side (default: 2448, DeepGlobe's)")
    a("--mode", type=int, choices=[1, 2, 3], default=3, help="stage predicting (default: 3)")
    a("--backbone", choices=BACKBONES, default="resnet50", help="network of the checkpoints written "
      "(default: resnet50, the authors')")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="predict.py's --device (default: cuda "
      "when there is one)")
    a("--host_only", action="store_true", help="only time the reading and writing, not predict.py")
    a("--read_threads", type=int, default=None, help="with --write_threads: the reading and writing threads to time "
      "(default: predict.py's on --device)")
    a("--write_threads", type=int, default=None, help="see --read_threads")
    add_output_flags(p)
    a("predict_flags", nargs="*", help="more predict.py flags, after --, e.g. -- --amp bf16 --channels_last")
    return p


@reports_failed_commands
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.host_only and not 0 < args.warm < args.count:
        parser.error(f"--warm must be above 0 and below --count ({args.count}), got {args.warm}")
    threads = [n for n in (args.read_threads, args.write_threads) if n is not None]
    if len(threads) == 1 or min(threads, default=1) < 1:
        parser.error("give both --read_threads and --write_threads (1 or more), or neither")
    report = reporter(args.json)
    report(environment(args.device))
    with scratch_folder(args.folder, "predict_folder_") as folder:
        start = time.perf_counter()
        make_demo_copies(folder / "data", 0, args.count, args.size)
        samples = DEEP_GLOBE.samples(folder / "data" / "crossvali")
        record = {"count": args.count, "size": args.size, "device": args.device,
                  "make_seconds": round(time.perf_counter() - start, 1), **host_only(args, samples, folder / "host")}
        if not args.host_only:
            record.update({"mode": args.mode, "backbone": args.backbone, "predict_flags": list(args.predict_flags),
                           **through_predict(args, samples, folder)})
        report(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
