"""The speed targets (bench/README.md, Targets) as a run of bench/gpu_checks.sh measured
them: a Markdown summary, from the run's files alone, for bench/README.md.

    python bench/gpu_report.py bench/results/gpu_checks-<hash>

1. Mode 3, 2448 x 2448, bf16 in-process (bench_inference's cases): images/s, peak allocated
   memory (warm-up included, and the timed runs alone), NVML's figure for the process; met
   where one case reaches 30 images/s with its peak allocated under 1 GB, read as 10^9 bytes
   (953.7 MiB), the stricter reading.
2. predict.py over a folder, files in to files out: its images/s against the in-process
   figure of the same flags (eager, and compiled); met at 80 % or more.
3. The training schedule estimated from measured epochs (train_schedule.py): met under 3 hours
   with the fast settings; the faithful fp32 default beside it.
Then the cases that failed, were cut off by the budget or skipped (timeline.txt), and the
CUDA tests' last line. Each verdict names the files it comes from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

MIB = 1 << 20
TARGET_IMAGES_PER_S = 30.0
TARGET_PEAK_MB = 1e9 / MIB
TARGET_END_TO_END = 0.8
TARGET_SCHEDULE_HOURS = 3.0
# (name of bench_inference's output, the in-process case it is, the predict_folder run it backs)
EVAL_CASES = [("eval_bf16_cudnn", "6 per pass, cuDNN autotuner", None),
              ("eval_bf16_mb2", "2 per pass", None),
              ("eval_bf16_compile_mb6", "6 per pass, compiled", "predict_folder_bf16_compile"),
              ("eval_bf16_mb6", "6 per pass", "predict_folder_bf16"),
              ("eval_bf16_compile_mb2", "2 per pass, compiled", None),
              ("eval_bf16_mb36", "36 per pass, cuDNN autotuner", None)]


def read_records(path: Path) -> Optional[list[dict[str, Any]]]:
    """The JSON records of a benchmark's --json file: bench_inference writes one array,
    the others one object per line (the first describing the machine). None if the file is
    missing or cut short."""
    if not path.exists():
        return None
    text = path.read_text()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return None


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def _nvml(record: dict[str, Any]) -> str:
    process, device = record.get("nvml_process_mb"), record.get("nvml_device_mb")
    shown = _mib(process) + (" (the only process)" if record.get("nvml_process_of") == "the only process" else "")
    return f"{shown}; device {_mib(device)}" if device is not None else shown


def in_process(run: Path) -> tuple[list[str], dict[str, float]]:
    """Target 1's lines, and each case's images/s by its file's name."""
    lines = ["| case | images/s | peak allocated | timed runs alone | NVML | first image |",
             "| --- | --- | --- | --- | --- | --- |"]
    rates, met = {}, []
    for name, label, _ in EVAL_CASES:
        records = read_records(run / f"{name}.json")
        if not records:
            lines.append(f"| {label} (`{name}`) | not measured | | | | |")
            continue
        r = records[0]
        rates[name] = r["images_per_s"]
        lines.append(f"| {label} (`{name}`) | {r['images_per_s']:.1f} | {_mib(r['peak_mb'])} | "
                     f"{_mib(r.get('steady_peak_mb'))} | {_nvml(r)} | {r['first_seconds']:.1f} s |")
        if r["images_per_s"] >= TARGET_IMAGES_PER_S and r["peak_mb"] < TARGET_PEAK_MB:
            met.append(f"`{name}`")
    verdict = (f"**Met** by {', '.join(met)}" if met else "**Not measured**" if not rates else
               f"**Not met**: no case reached {TARGET_IMAGES_PER_S:.0f} images/s with its peak under 10^9 bytes")
    return ["## 1. In-process, mode 3, 2448 x 2448, bf16 + channels-last", "",
            f"Met at {TARGET_IMAGES_PER_S:.0f} images/s with the peak allocated under 10^9 bytes "
            f"({TARGET_PEAK_MB:.1f} MiB). NVML: the process as nvidia-smi shows it, and the whole device.", "",
            *lines, "", verdict + ".", ""], rates


def end_to_end(run: Path, rates: dict[str, float]) -> list[str]:
    lines = ["## 2. predict.py over a folder, files in to files out", ""]
    for eval_name, label, folder_name in EVAL_CASES:
        if folder_name is None:
            continue
        records = read_records(run / f"{folder_name}.json")
        measured = [r for r in records or [] if "images_per_second" in r]
        if not measured:
            lines.append(f"- {label} (`{folder_name}`): not measured.")
            continue
        r = measured[-1]
        host = f"; the host alone {r['host_images_per_second']:.1f}"
        if eval_name not in rates:
            lines.append(f"- {label}: {r['images_per_second']:.1f} images/s{host}; no in-process figure "
                         f"(`{eval_name}`) to set it against.")
            continue
        share = r["images_per_second"] / rates[eval_name]
        verdict = "met" if share >= TARGET_END_TO_END else "not met"
        lines.append(f"- {label} (`{folder_name}` against `{eval_name}`): {r['images_per_second']:.1f} against "
                     f"{rates[eval_name]:.1f} images/s in-process, {share:.0%} ({verdict}){host}.")
    return [*lines, ""]


def schedule(run: Path) -> list[str]:
    lines = ["## 3. The training schedule, 120 + 50 + 120 epochs of DeepGlobe", ""]
    for name, label in (("train_schedule_bf16", "fast settings"), ("train_schedule_fp32", "the faithful fp32 default")):
        records = read_records(run / f"{name}.json") or []
        stages = [r for r in records if "deepglobe_stage_hours" in r]
        total = [r["schedule_hours"] for r in records if "schedule_hours" in r]
        if not total:
            lines.append(f"- {label} (`{name}`): not measured.")
            continue
        per_stage = ", ".join(f"stage {r['stage']} {r['deepglobe_stage_hours']:.2f} h" for r in stages)
        verdict = "" if name.endswith("fp32") else \
            f" ({'met' if total[0] < TARGET_SCHEDULE_HOURS else 'not met'}: under {TARGET_SCHEDULE_HOURS:.0f} h)"
        lines.append(f"- {label} (`{name}`): {total[0]:.2f} h{verdict}; {per_stage}.")
    return [*lines, ""]


def _last_line(path: Path, missing: str) -> str:
    text = path.read_text().strip() if path.exists() else ""
    return text.splitlines()[-1] if text else missing


def the_run(run: Path) -> list[str]:
    """The commit, the software, the CUDA tests' verdict and every case whose last entry in
    the timeline (a run continued with GPU_CHECKS_FROM has two) did not end well."""
    latest: dict[str, str] = {}
    interrupted = []
    for line in (run / "timeline.txt").read_text().splitlines():
        entry = line.split(" ", 1)[1]
        if re.match(r"\S+ (rc=|skipped: )", entry):
            latest[entry.split()[0]] = entry
        elif entry.startswith("interrupted"):
            interrupted.append(entry)
    failed = [e for e in latest.values() if (rc := re.search(r" rc=(\d+)", e)) and rc.group(1) != "0"]
    skipped = [name for name, e in latest.items() if " skipped: " in e]
    software = (run / "torch.txt").read_text().strip().splitlines() if (run / "torch.txt").exists() else []
    return ["## The run", "", f"- commit {_last_line(run / 'commit.txt', 'unknown')}",
            *(f"- {line}" for line in software),
            f"- CUDA tests (`pytest_cuda.txt`): {_last_line(run / 'pytest_cuda.txt', 'not run')}",
            *(f"- {e}" for e in failed + interrupted), *([f"- skipped: {', '.join(skipped)}"] if skipped else []), ""]


def report(run: Path) -> str:
    target1, rates = in_process(run)
    return "\n".join([f"# bench/gpu_checks.sh: {run.name}", "", *the_run(run), *target1, *end_to_end(run, rates),
                      *schedule(run)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the folder bench/gpu_checks.sh wrote (OUT)")
    args = p.parse_args(argv)
    if not (args.run / "timeline.txt").exists():
        p.error(f"{args.run} holds no run of bench/gpu_checks.sh (no timeline.txt)")
    print(report(args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
