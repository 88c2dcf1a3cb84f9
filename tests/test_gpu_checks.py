"""What runs only where a GPU is lent, for minutes, with no second chance, tested without one.

bench/gpu_checks.sh runs with a stand-in python that records each command instead of running
it, so that every command is known to parse, the targets come first, the budget holds and
what the lent machine returns (one archive) holds every output. bench/gpu_memory.py reads
NVML through a stand-in of its library."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
import torch

import config
import predict
from bench import bench_inference, predict_folder, predict_large_rss, train_schedule
from bench.gpu_memory import nvml_memory
from bench.gpu_report import in_process

ROOT = Path(__file__).resolve().parents[1]

# Records its arguments and PYTHONPATH; with FAKE_NO_GPU, the probe of torch (its code on
# stdin) finds no GPU; a benchmark (a script, not -c or -m) then sleeps FAKE_SECONDS, as a
# long case would, and where FAKE_RESULTS (a JSON file) names its --json file's stem, appends
# that text there and exits with that status.
FAKE = """import json, os, sys, time
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "pythonpath": os.environ.get("PYTHONPATH", "")}) + "\\n")
if sys.argv[1] == "-" and os.environ.get("FAKE_NO_GPU"):
    sys.exit(3)  # the probe of torch and the GPU, where torch sees none
if sys.argv[1].startswith("bench/"):
    time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
    results = json.load(open(os.environ["FAKE_RESULTS"])) if "FAKE_RESULTS" in os.environ else {}
    path = sys.argv[sys.argv.index("--json") + 1]
    text, status = results.get(os.path.basename(path)[:-5], ("", 0))
    if text:
        open(path, "a").write(text)  # appended, as the benchmarks append to their --json files
    sys.exit(status)
"""


def stand_in(tmp_path: Path, **env: str) -> dict[str, str]:
    """Writes the stand-in python into tmp_path; the environment that makes the script use it
    and log its calls to tmp_path/calls.jsonl."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE}")
    fake.chmod(0o755)
    return {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(tmp_path / "calls.jsonl"), **env}


def run_checks(tmp_path: Path, **env: str) -> tuple[list[dict], Path, subprocess.CompletedProcess]:
    """Runs the script with the stand-in; returns the recorded calls, OUT and the process."""
    log, out = tmp_path / "calls.jsonl", tmp_path / "gpu_checks"
    done = subprocess.run(["bash", "bench/gpu_checks.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=stand_in(tmp_path, **env), timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return calls, out, done


def timeline(out: Path) -> list[str]:
    return (out / "timeline.txt").read_text().splitlines()


def test_without_a_gpu_it_stops_before_the_first_case(tmp_path):
    calls, out, done = run_checks(tmp_path, FAKE_NO_GPU="1", GPU_CHECKS_ARCHIVE=str(tmp_path / "a.tar.gz"))
    assert done.returncode == 2
    assert not [call for call in calls if call["argv"][0].startswith("bench/")]
    assert "cannot use torch or sees no CUDA GPU" in timeline(out)[-1]
    with tarfile.open(tmp_path / "a.tar.gz") as packed:
        assert "gpu_checks/torch.txt" in packed.getnames()


def test_every_command_parses_and_the_targets_come_first(tmp_path):
    calls, out, done = run_checks(tmp_path)
    assert done.returncode == 0, done.stderr
    scripts = [call["argv"] for call in calls if call["argv"][0].startswith("bench/")]
    # Each benchmark's flags, and the flags it hands predict.py or train_deep_globe.py, parse.
    inner = {"bench/predict_folder.py": lambda flags: predict.parse_args(["--input", "i", "--output", "o", *flags]),
             "bench/predict_large_rss.py": lambda flags: predict.parse_args(["--input", "i", "--output", "o", *flags]),
             "bench/train_schedule.py": config.parse_args}
    outer = {"bench/bench_inference.py": bench_inference, "bench/predict_folder.py": predict_folder,
             "bench/predict_large_rss.py": predict_large_rss, "bench/train_schedule.py": train_schedule}
    parsed = []
    for argv in scripts:
        args = outer[argv[0]].build_parser().parse_args(argv[1:])
        flags = getattr(args, "predict_flags", None) or getattr(args, "train_flags", None)
        if argv[0] in inner:
            inner[argv[0]](flags or [])
        else:
            assert args.device == "cuda" and args.json
        parsed.append((argv[0], args, flags))

    # The speed targets first (bench/README.md, Targets): mode 3 at 2448 in bf16 in-process, eager; predict.py over a
    # folder; the training schedule with the fast settings; compiled in-process; the
    # faithful fp32 schedule, with train_deep_globe.py's defaults.
    first = [(name.split("/")[1], getattr(args, "compile", False)) for name, args, _ in parsed[:7]]
    assert first == [("bench_inference.py", False)] * 3 + [("predict_folder.py", False), ("train_schedule.py", False),
                                                           ("bench_inference.py", True), ("train_schedule.py", False)]
    for name, args, flags in parsed[:6]:
        if name == "bench/bench_inference.py":
            assert args.modes == [3] and args.sizes == [2448] and args.amp == "bf16" and args.channels_last
        else:
            assert "--amp" in flags and "--channels_last" in flags
    assert [args.micro_batch_size for _, args, _ in parsed[:3]] == [None, 2, None]
    assert [args.cudnn_benchmark for _, args, _ in parsed[:3]] == [True, False, False]  # the third is predict.py's
    assert "--num_workers" in parsed[4][2] and parsed[6][2] == []
    assert any(call["argv"][:2] == ["-m", "pytest"] and "gpu" in call["argv"] for call in calls)

    # One line per case in the timeline, every output in the folder.
    cases = [line for line in timeline(out) if " rc=" in line]
    assert len(cases) == len(scripts) + 1 and all(" rc=0 " in line for line in cases)  # and pytest
    assert {f"{line.split()[1]}.txt" for line in cases} <= {p.name for p in out.iterdir()}


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    calls, out, done = run_checks(tmp_path, GPU_CHECKS_BUDGET="1")
    before = timeline(out)
    calls, out, again = run_checks(tmp_path, GPU_CHECKS_BUDGET="1")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert timeline(out) == before


def test_the_budget_cuts_the_case_it_reaches_and_skips_the_rest_into_one_archive(tmp_path):
    archive = tmp_path / "returned" / "gpu_checks.tar.gz"
    archive.parent.mkdir()
    # 3 s: bash's SECONDS steps at whole seconds of the clock, so the set-up may take one.
    calls, out, done = run_checks(tmp_path, GPU_CHECKS_BUDGET="3", FAKE_SECONDS="30",
                                  GPU_CHECKS_ARCHIVE=str(archive))
    assert done.returncode == 0, done.stderr
    assert [call["argv"][0] for call in calls if call["argv"][0].startswith("bench/")] == ["bench/bench_inference.py"]
    lines = timeline(out)
    assert "eval_bf16_cudnn rc=124" in lines[1] and lines[1].endswith("s), cut off")
    skipped = [line for line in lines if "skipped: the budget of 3 s is spent" in line]
    assert len(skipped) == 17 and lines[-1].endswith("done")
    # What a lent machine returns: one file, holding OUT as it ended.
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        packed = tar.extractfile("gpu_checks/timeline.txt").read().decode().splitlines()
    assert {"gpu_checks/timeline.txt", "gpu_checks/commit.txt", "gpu_checks/eval_bf16_cudnn.txt"} <= names
    assert packed == lines


def test_a_second_call_continues_the_run_from_the_case_named(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"eval_bf16_cudnn": ["first call", 0], "eval_bf16_mb2": ["first call", 0]}))
    calls, out, done = run_checks(tmp_path, FAKE_RESULTS=str(results))
    first = timeline(out)
    results.write_text(json.dumps({"eval_bf16_cudnn": ["second call", 0], "eval_bf16_mb2": ["second call", 0]}))
    calls, out, again = run_checks(tmp_path, GPU_CHECKS_FROM="eval_bf16_mb2", FAKE_RESULTS=str(results))
    assert again.returncode == 0, again.stderr
    added = timeline(out)[len(first):]
    assert added[0].endswith("from eval_bf16_mb2") and " eval_bf16_mb2 rc=0 " in added[1]
    assert len([line for line in added if " rc=0 " in line]) == 17 and added[-1].endswith("done")
    # The cases before it keep their files; the case named is measured afresh, not appended to.
    assert (out / "eval_bf16_cudnn.json").read_text() == "first call"
    assert (out / "eval_bf16_mb2.json").read_text() == "second call"
    (tmp_path / "again").mkdir()
    calls, out, wrong = run_checks(tmp_path / "again", GPU_CHECKS_FROM="eval_bf16_mb")
    assert wrong.returncode == 2 and "GPU_CHECKS_FROM=eval_bf16_mb names no case" in wrong.stderr and calls == []


def test_an_interrupt_stops_the_case_and_keeps_what_was_measured(tmp_path):
    archive = tmp_path / "gpu_checks.tar.gz"
    out = tmp_path / "gpu_checks"
    env = stand_in(tmp_path, FAKE_SECONDS="60", GPU_CHECKS_ARCHIVE=str(archive))
    run = subprocess.Popen(["bash", "bench/gpu_checks.sh", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "calls.jsonl").exists() or "bench/" not in (tmp_path / "calls.jsonl").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=20) == 130
    lines = timeline(out)
    assert lines[-1].endswith(" interrupted during eval_bf16_cudnn")
    with tarfile.open(archive) as tar:
        assert tar.extractfile("gpu_checks/timeline.txt").read().decode().splitlines() == lines
    case = json.loads((tmp_path / "calls.jsonl").read_text().splitlines()[-1])
    assert case["argv"][0] == "bench/bench_inference.py"
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "python")], capture_output=True).stdout == b""


def test_wheels_are_installed_first_and_on_every_later_path(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "tensorboardx-2.6.5-py3-none-any.whl").write_bytes(b"")
    calls, out, done = run_checks(tmp_path, GPU_CHECKS_WHEELS=str(wheels), GPU_CHECKS_BUDGET="1", TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    install = calls[0]["argv"]
    site = str(tmp_path / "gpu_checks_site")
    assert install[:3] == ["-m", "pip", "install"] and "--no-index" in install
    assert install[install.index("--target") + 1] == site and install[-1] == str(wheels / "tensorboardx-2.6.5-py3-none-any.whl")
    assert all(call["pythonpath"].split(":")[0] == site for call in calls[1:])
    assert "wheels from" in timeline(out)[1]


def test_settings_that_cannot_work_stop_before_anything_runs(tmp_path):
    for env, message in [({"GPU_CHECKS_BUDGET": "9m"}, "must be whole seconds"),
                         ({"GPU_CHECKS_ARCHIVE": str(tmp_path / "no" / "a.tar.gz")}, "folder does not exist")]:
        calls, out, done = run_checks(tmp_path, **env)
        assert done.returncode == 2 and message in done.stderr and calls == [] and not out.exists()


def fake_nvml(processes: dict[int, list[tuple[int, int]]], used: dict[int, int], fail_init: bool = False):
    """A stand-in for pynvml: devices 0 and 1, on PCI buses 0x19 and 0x3b; `processes`
    gives each device's (pid, bytes) and `used` its bytes in use."""
    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("driver not loaded")

    buses = {0: 0x19, 1: 0x3B}
    return types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(domain=0, bus=buses[h], device=0),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used[h]),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=pid, usedGpuMemory=n)
                                                        for pid, n in processes[h]])


@pytest.fixture
def on_bus_0x3b(monkeypatch):
    """torch's device: the one on PCI bus 0x3b, NVML's device 1."""
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)


MIB = 1 << 20


def test_nvml_memory_is_this_process_on_the_device_torch_uses(monkeypatch, on_bus_0x3b):
    me = os.getpid()
    nvml = fake_nvml({0: [(me, 900 * MIB)], 1: [(me + 1, 50 * MIB), (me, 1500 * MIB)]}, {0: 1000 * MIB, 1: 2000 * MIB})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvml_memory(torch.device("cuda", 0)) == {"nvml_process_mb": 1500.0, "nvml_process_of": "this process id",
                                                    "nvml_device_mb": 2000.0}


NOTHING = {"nvml_process_mb": None, "nvml_process_of": None, "nvml_device_mb": None}


@pytest.mark.parametrize("processes, fail_init, expected", [
    # A sandbox: NVML sees other process ids; one process alone can only be this one.
    ({0: [(7, 9 * MIB)], 1: [(1, 5 * MIB)]}, False,
     {"nvml_process_mb": 5.0, "nvml_process_of": "the only process", "nvml_device_mb": 7.0}),
    ({0: [], 1: [(1, 5 * MIB), (2, 1 * MIB)]}, False, {**NOTHING, "nvml_device_mb": 7.0}),  # which one is unknown
    ({0: [], 1: [(os.getpid(), None)]}, False, {**NOTHING, "nvml_device_mb": 7.0}),  # withheld
    ({0: [], 1: []}, True, NOTHING),  # no driver
])
def test_nvml_memory_says_none_where_nvml_cannot_tell(monkeypatch, on_bus_0x3b, processes, fail_init, expected):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(processes, {0: 0, 1: 7 * MIB}, fail_init))
    assert nvml_memory(torch.device("cuda")) == expected


def test_nvml_memory_without_its_library_or_with_one_it_does_not_know(monkeypatch, on_bus_0x3b):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert nvml_memory(torch.device("cuda")) == NOTHING
    old = fake_nvml({0: [], 1: []}, {0: 0, 1: 0})
    del old.nvmlDeviceGetPciInfo
    monkeypatch.setitem(sys.modules, "pynvml", old)
    assert nvml_memory(torch.device("cuda")) == NOTHING


def eval_record(images_per_s: float, peak_mb: float) -> str:
    """bench_inference's --json file of one case, made by its own Record."""
    record = bench_inference.Record(case={"mode": 3, "size": 2448}, seconds=1 / images_per_s, runs=[1 / images_per_s],
                                    peak_mb=peak_mb, peak_of="cuda allocated", patches=36, first_seconds=40.0,
                                    steady_peak_mb=peak_mb - 10, nvml_process_mb=peak_mb + 600)
    return json.dumps([bench_inference.record_to_json(record)])


def lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in ({"commit": "abc", "cuda": "NVIDIA H200"}, *records))


def test_the_report_reads_each_target_from_the_run(tmp_path):
    results = {
        "eval_bf16_cudnn": (eval_record(40.0, 1400.0), 0),
        "eval_bf16_mb2": (eval_record(31.0, 900.0), 0),
        "eval_bf16_compile_mb6": (eval_record(35.0, 960.0), 0),  # under 1 GiB, not under 10^9 bytes
        "eval_bf16_mb6": (eval_record(20.0, 1300.0), 0),
        "eval_bf16_compile_mb2": ("", 1),  # failed
        "predict_folder_bf16": (lines({"host_images_per_second": 50.0, "images_per_second": 17.0}), 0),
        "predict_folder_bf16_compile": (lines({"host_images_per_second": 50.0, "images_per_second": 21.0}), 0),
        "train_schedule_bf16": (lines(*({"stage": k, "deepglobe_stage_hours": h} for k, h in ((1, .5), (2, 1.), (3, 1.))),
                                      {"schedule_hours": 2.5}), 0),
        "train_schedule_fp32": (lines({"stage": 1, "deepglobe_stage_hours": 9.1}, {"schedule_hours": 9.1}), 0),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    calls, out, done = run_checks(tmp_path, FAKE_RESULTS=str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr
    report = subprocess.run([sys.executable, "bench/gpu_report.py", str(out)], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "| 2 per pass (`eval_bf16_mb2`) | 31.0 | 900 MiB | 890 MiB | 1500 MiB | 40.0 s |" in report
    assert "**Met** by `eval_bf16_mb2`." in report
    assert "| 36 per pass, cuDNN autotuner (`eval_bf16_mb36`) | not measured |" in report
    assert "17.0 against 20.0 images/s in-process, 85% (met); the host alone 50.0." in report
    assert "21.0 against 35.0 images/s in-process, 60% (not met)" in report
    assert "- fast settings (`train_schedule_bf16`): 2.50 h (met: under 3 h); stage 1 0.50 h, stage 2 1.00 h" in report
    assert "- the faithful fp32 default (`train_schedule_fp32`): 9.10 h; stage 1 9.10 h." in report
    assert "- eval_bf16_compile_mb2 rc=1" in report and "rc=0" not in report and "skipped" not in report


def test_the_report_says_what_is_missing(tmp_path):
    calls, out, done = run_checks(tmp_path, GPU_CHECKS_BUDGET="3", FAKE_SECONDS="10")
    report = subprocess.run([sys.executable, "bench/gpu_report.py", str(out)], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "**Not measured**." in report
    assert "- 6 per pass (`predict_folder_bf16`): not measured." in report
    assert "- fast settings (`train_schedule_bf16`): not measured." in report
    assert "- eval_bf16_cudnn rc=124" in report and "- skipped: eval_bf16_mb2, " in report
    refused = subprocess.run([sys.executable, "bench/gpu_report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "holds no run of bench/gpu_checks.sh" in refused.stderr


def test_a_fast_case_over_the_memory_bound_does_not_meet_the_first_target(tmp_path):
    (tmp_path / "eval_bf16_cudnn.json").write_text(eval_record(45.0, 1000.0))  # 10^9 bytes is 953.7 MiB
    (tmp_path / "eval_bf16_mb2.json").write_text(eval_record(29.9, 700.0))
    lines, rates = in_process(tmp_path)
    assert rates == pytest.approx({"eval_bf16_cudnn": 45.0, "eval_bf16_mb2": 29.9})
    assert "**Not met**: no case reached 30 images/s with its peak under 10^9 bytes." in lines


def test_the_report_of_a_continued_run_takes_each_cases_last_entry(tmp_path):
    calls, out, done = run_checks(tmp_path, GPU_CHECKS_BUDGET="3", FAKE_SECONDS="10")
    assert "eval_bf16_cudnn rc=124" in (out / "timeline.txt").read_text()
    calls, out, again = run_checks(tmp_path, GPU_CHECKS_FROM="eval_bf16_cudnn")
    report = subprocess.run([sys.executable, "bench/gpu_report.py", str(out)], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "rc=124" not in report and "skipped" not in report
