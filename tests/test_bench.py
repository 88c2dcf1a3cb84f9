"""The inference benchmark on tiny cases: in-process, through its command line (one fresh
process per case) and timing train_deep_globe.py as a whole."""
import json
import re
import statistics
import subprocess

import pytest
import torch

import config
from bench import bench_inference
from bench.bench_inference import Case, build_parser, cases_of, format_row, main, record_to_json, rule_session, run_case
from bench.op_count import KernelCount, OpCount, show_compiled_kernels
from bench.tensor_peak import TensorPeak, module_tensors

# One thread: these tests check what the benchmark reports, not speed, and a single
# thread stays fast on a busy shared machine where two threads contend.
TINY = dict(size=128, size_g=(64, 64), size_p=(96, 96), sub_batch_size=4, backbone="resnet18", repeat=2, threads=1)
TINY_FLAGS = ["--sizes", "128", "--size_g", "64", "--size_p", "96", "--sub_batch_size", "4",
              "--backbone", "resnet18", "--repeat", "1", "--device", "cpu", "--threads", "1"]


def check_record(record: dict, kind: str, mode: int, patches: int) -> None:
    assert record["case"]["kind"] == kind and record["case"]["mode"] == mode
    assert record["seconds"] > 0 and record["images_per_s"] == pytest.approx(1 / record["seconds"])
    assert record["peak_mb"] > 0 and record["peak_of"] == "process rss"
    assert record["patches"] == patches
    assert record["environment"]["threads"] == 1


@pytest.mark.parametrize("mode, kind, patches", [(1, "eval", 0), (3, "eval", 4), (2, "train", 4)])
def test_run_case_measures_every_repeat(mode, kind, patches):
    record = run_case(Case(mode, kind=kind, **TINY))
    assert len(record.runs) == TINY["repeat"] and all(t > 0 for t in record.runs)
    assert min(record.runs) <= record.seconds <= max(record.runs)
    assert record.first_seconds > 0  # the warm-up, timed apart
    check_record(record_to_json(record), kind, mode, patches)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        run_case(Case(1, kind="infer", **TINY))


def test_cases_cover_sizes_modes_and_kinds():
    args = build_parser().parse_args(["--sizes", "256,512", "--modes", "1,3", "--train", "--size_p", "128"])
    cases = cases_of(args)
    assert [(c.size, c.mode, c.kind) for c in cases] == [
        (s, m, k) for s in (256, 512) for m in (1, 3) for k in ("eval", "train")
    ]
    assert all(c.size_p == (128, 128) and c.backbone == "resnet50" for c in cases)
    assert all(c.kind == "eval" for c in cases_of(build_parser().parse_args(["--train", "--via-cli"])))


def test_command_line_runs_each_case_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY_FLAGS, "--modes", "1", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    check_record(record, "eval", 1, 0)
    table = capsys.readouterr().out
    assert "s/image" in table and "peak MB" in table and len(table.strip().splitlines()) == 3


def test_via_cli_times_the_real_entry_point(tmp_path):
    out = tmp_path / "cli.json"
    assert main([*TINY_FLAGS, "--modes", "3", "--via-cli", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    check_record(record, "cli-eval", 3, 4)
    # A whole process: at least the size of an imported torch.
    assert record["peak_mb"] > 200


@pytest.mark.parametrize("flags, message", [(["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
                                            (["--amp", "bf16", "--via-cli"], "--amp bf16 on this CPU: it has no bf16")],
                         ids=["fp16", "bf16-cli"])
def test_cpu_autocast_is_refused_where_the_cpu_cannot_run_it(flags, message, monkeypatch):
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(bench_inference, "run_case_isolated", lambda case: pytest.fail("ran a case"))
    monkeypatch.setattr(bench_inference, "run_cli_case", lambda case, folder: pytest.fail("ran a case"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*TINY_FLAGS, *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sizes", "0"], "--sizes takes positive image sides"),
        (["--sizes", ","], "--sizes takes positive image sides"),
        (["--modes", "4"], "--modes takes 1, 2 and 3"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--device", "gpu"], "--device gpu: not a device"),
        (["--size_p", "30"], "--size_p 30 must be a multiple of 4 (the network's output stride), e.g. 508; --size_p must"),
        (["--compile", "--train"], "--compile applies to evaluation; drop --train"),
        (["--compile", "--count_ops"], "--tensor_peak and --count_ops would measure the eager networks"),
        (["--count_kernels", "--device", "cuda"], "--count_kernels counts on the CPU"),
    ],
)
def test_flags_that_cannot_work_stop_before_any_case(flags, message, monkeypatch):
    monkeypatch.setattr(bench_inference, "run_case_isolated", lambda case: pytest.fail("ran a case"))
    with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
        main([*TINY_FLAGS, *flags])


def test_tensor_peak_counts_each_storage_once_while_it_lives():
    mb = 1 << 20
    kept = torch.empty(mb, dtype=torch.uint8)
    with TensorPeak() as tensors:
        tensors.track([kept, kept[:10]])
        a = torch.empty(2 * mb, dtype=torch.uint8)
        view = a[:10]
        del a
        assert tensors.current == 3 * mb  # a view keeps its storage alive
        del view
        assert tensors.current == mb
        b = torch.empty(3 * mb, dtype=torch.uint8)
    assert tensors.peak == 4 * mb and tensors.current == 4 * mb
    del b
    assert tensors.current == mb


def test_bf16_evaluation_on_the_cpu_reports_the_tensor_peak(capsys):
    """CPU autocast stands in for a GPU's: convolution weights stored in bf16 hold less
    than fp32 ones, and the table shows the tensor peak of each case."""
    fp32 = run_case(Case(3, tensor_peak=True, **{**TINY, "repeat": 1}))
    bf16 = run_case(Case(3, amp="bf16", tensor_peak=True, **{**TINY, "repeat": 1}))
    weights = sum(t.numel() * 4 for t in module_tensors(rule_session(Case(3, **TINY)).model))
    assert weights < fp32.tensor_peak_mb * (1 << 20)
    assert bf16.tensor_peak_mb < fp32.tensor_peak_mb - 0.4 * weights / (1 << 20)
    assert format_row(bf16).split()[-3] == f"{bf16.tensor_peak_mb:.0f}"
    assert run_case(Case(3, **{**TINY, "repeat": 1})).tensor_peak_mb is None


def test_op_count_tells_views_from_kernels():
    x = torch.ones(3)
    with OpCount() as count:
        y = x[1:]  # a view
        z = y + 1
        torch.zeros(2)
        z.view(2, 1)  # a view
    assert (count.calls, count.views) == (4, 2)


@pytest.fixture
def kernel_profile_restored(monkeypatch):
    """show_compiled_kernels sets inductor's configuration for the process; undone after."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", inductor_config.cpp.enable_kernel_profile)


def test_kernel_count_sees_into_compiled_code(kernel_profile_restored):
    """Eager, three operators are three kernels; compiled, inductor fuses them into one,
    which the profiler shows once inductor records its kernels (OpCount's dispatch mode
    would make the compiled function run eager)."""
    show_compiled_kernels()

    def f(x):
        return x.sin().cos().add(1)

    compiled, x = torch.compile(f), torch.randn(100)
    compiled(x)
    counts = []
    for fn in (f, compiled):
        with KernelCount() as count:
            fn(x)
        counts.append((count.calls, count.views, count.compiled))
    assert counts == [(3, 0, 0), (1, 0, 1)]
    with KernelCount() as count:
        y = x[1:]  # a view
        z = y + 1
        torch.zeros(2)  # one call, however many operators it calls inside
        z.view(-1, 1)  # a view
        x.view(10, 10).t().reshape(-1)  # two views, then a view's call that must copy: a kernel
    assert (count.calls, count.views) == (7, 4)


def test_count_kernels_reports_host_calls_per_image(kernel_profile_restored):
    record = run_case(Case(3, count_kernels=True, **{**TINY, "repeat": 1}))
    assert record.kernels > record.kernel_views > 0 and record.kernels_compiled == 0
    assert format_row(record).split()[-1] == str(record.kernels)


def test_count_ops_reports_operators_per_image(capsys):
    record = run_case(Case(3, count_ops=True, **{**TINY, "repeat": 1}))
    assert record.ops > record.view_ops > 0
    assert format_row(record).split()[-2] == str(record.ops)
    assert run_case(Case(1, **{**TINY, "repeat": 1})).ops is None


def test_via_cli_peak_is_the_commands_own():
    """A child inherits its parent's high-water RSS over exec on Linux; the launcher keeps
    this (large) test process's peak out of the measured one."""
    import sys

    import numpy as np

    from bench.bench_inference import run_measured

    ballast = np.ones(300 << 20, dtype=np.uint8)  # this process now peaks above 300 MB
    seconds, peak = run_measured([sys.executable, "-c", "pass"], {})
    assert seconds > 0 and 0 < peak < 100
    with pytest.raises(RuntimeError, match="failed"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"], {})
    del ballast


def test_synthetic_pyramid_levels_are_the_image_strided(tmp_path):
    """bench/large_io_rss.make_tiff writes each level without the image in memory; level k
    must be the full-resolution pixels taken every 2**k (edges included)."""
    import tifffile

    from bench.large_io_rss import make_tiff

    make_tiff(tmp_path / "x.tif", 1101, 701, levels=2)
    with tifffile.TiffFile(tmp_path / "x.tif") as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert [a.shape for a in levels] == [(1101, 701, 3), (551, 351, 3), (276, 176, 3)]  # halvings round up
    for k, a in enumerate(levels[1:], start=1):
        assert (a == levels[0][:: 2**k, :: 2**k]).all()


def test_predict_large_benchmark_runs_predict_on_its_synthetic_tiff(tmp_path, capsys):
    from bench import predict_large_rss

    flags = ["--sizes", "200x700", "--mode", "2", "--backbone", "resnet18", "--size_g", "64", "--size_p", "96",
             "--threads", "1", "--folder", str(tmp_path), "--json", str(tmp_path / "r.jsonl")]
    assert predict_large_rss.main([*flags, "--", "--micro_batch_size", "2"]) == 0
    environment, record = (json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines())
    assert environment["threads"] == 1 and environment["commit"]
    # The spec's grid: from ceil(side / 96) patches, more until neighbours overlap by 50 px:
    # 4 rows (96 - 104 / 3 >= 50) by 15 columns (96 - 604 / 14 >= 50). No level: 700 < 2048.
    assert record["size"] == [200, 700] and record["patches"] == 4 * 15 and record["levels"] == 0
    # Halvings until the longest side is under 2048: 2100 needs one, 4100 two (2050 is not under).
    assert [predict_large_rss.default_levels(300, w) for w in (2047, 2100, 4100)] == [0, 1, 2]
    assert record["predict_flags"] == ["--micro_batch_size", "2"]
    assert record["peak_rss_mb"] > 0 and record["seconds"] > 0 and record["input_mb"] >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # its temporary folder is gone


def test_predict_folder_benchmark_times_predict_and_the_host_alone(tmp_path, capsys):
    from bench import predict_folder

    # Images that take long enough together (mode 3, 2 x 2 patches each) for start-up's
    # jitter not to swamp the difference between the two runs.
    flags = ["--count", "6", "--warm", "1", "--size", "128", "--mode", "3", "--backbone", "resnet18", "--device",
             "cpu", "--folder", str(tmp_path), "--json", str(tmp_path / "r.jsonl")]
    assert predict_folder.main([*flags, "--", "--size_g", "64", "--size_p", "96", "--micro_batch_size", "4"]) == 0
    assert predict_folder.main([*flags, "--host_only"]) == 0
    environment, run, _, host = (json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines())
    assert environment["commit"] and environment["cuda"] is None
    assert run["seconds"] > run["warm_seconds"] > 0 and run["peak_rss_mb"] > 0
    assert run["images_per_second"] == pytest.approx(5 / (run["seconds"] - run["warm_seconds"]), rel=0.05)
    for record in run, host:
        assert (record["read_threads"], record["write_threads"]) == (1, 1)  # predict's on the CPU
        assert 6 / record["host_images_per_second"] == pytest.approx(record["host_seconds"], rel=0.01, abs=0.002)
    assert "images_per_second" not in host and "mode" not in host
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # its temporary folder is gone
    for bad, flag in (([*flags, "--warm", "6"], "--warm"),
                      ([*flags, "--host_only", "--read_threads", "0", "--write_threads", "1"], "--write_threads")):
        with pytest.raises(SystemExit) as stopped:
            predict_folder.main(bad)
        assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_train_schedule_runs_the_three_stage_scripts_and_scales_their_epochs(tmp_path):
    from bench import train_schedule

    flags = ["--train", "2", "--val", "1", "--size", "96", "--epochs", "1", "--folder", str(tmp_path), "--json",
             str(tmp_path / "r.jsonl"), "--", "--backbone", "resnet18", "--size_g", "64", "--size_p", "96",
             "--device", "cpu", "--num_workers", "0"]
    assert train_schedule.main(flags) == 0
    _, *stages, schedule = (json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines())
    assert [s["script"] for s in stages] == ["train_deep_globe_global.sh", "train_deep_globe_global2local.sh",
                                             "train_deep_globe_local2global.sh"]
    # GLNet's DeepGlobe split (454 training, 207 validation images) and schedule (120, 50, 120 epochs).
    for stage, epochs in zip(stages, (120, 50, 120)):
        per_train, per_val = stage["last_epoch_training_s"] / 2, stage["last_epoch_validation_s"] / 1
        assert stage["deepglobe_epoch_s"] == pytest.approx(454 * per_train + 207 * per_val, abs=0.1)
        assert stage["deepglobe_stage_hours"] == pytest.approx(stage["deepglobe_epoch_s"] * epochs / 3600, abs=0.01)
        assert stage["last_epoch_training_s"] > 0 and stage["seconds"] > stage["last_epoch_training_s"]
    assert schedule["schedule_hours"] == pytest.approx(sum(s["deepglobe_stage_hours"] for s in stages), abs=0.01)
    # Beside them, the stages' waits for their loaders, the first batch within the whole.
    for s in stages:
        assert 0 <= s["first_batch_training_s"] <= s["loader_wait_training_s"] <= s["last_epoch_training_s"]
        assert 0 <= s["first_batch_validation_s"] <= s["loader_wait_validation_s"] <= s["last_epoch_validation_s"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_the_schedule_reads_the_last_epochs_seconds_and_waits_from_a_log(tmp_path):
    from bench.train_schedule import last_epoch

    log = tmp_path / "log.txt"
    log.write_text("epoch 1/2  loss 1.0000  global train 0.1000 val 0.2000  (9.5 s training, 4.0 s validation)\n"
                   "loader waits in epoch 1: training 3.0 s (2.0 s for the first batch), validation 1.5 s (1.0 s)\n"
                   "epoch 2/2  loss 0.9000  global train 0.1500 val 0.2500  (8.25 s training, 3.5 s validation)\n"
                   "loader waits in epoch 2: training 2.5 s (0.75 s for the first batch), validation 1.25 s (0.5 s)\n")
    assert last_epoch(log) == {"last_epoch_training_s": 8.25, "last_epoch_validation_s": 3.5,
                               "loader_wait_training_s": 2.5, "first_batch_training_s": 0.75,
                               "loader_wait_validation_s": 1.25, "first_batch_validation_s": 0.5}


def test_loader_rate_times_the_trainers_loader_in_process(tmp_path, monkeypatch):
    """A worker's rate: the trainer's own loader (global images included), augmenting the
    training split only, run without workers on one torch thread, the first image of each
    split left out."""
    from bench import loader_rate

    seen, trainers_loader = [], loader_rate.make_loader

    def spying_loader(dataset, indices, **settings):
        assert settings["num_workers"] == 0 and torch.get_num_threads() == 1
        for batch in trainers_loader(dataset, indices, **settings):
            seen.append((dataset.augment, tuple(batch["global"][0].shape[-2:])))
            yield batch

    monkeypatch.setattr(loader_rate, "make_loader", spying_loader)
    flags = ["--images", "3", "--size", "300", "--folder", str(tmp_path), "--json", str(tmp_path / "r.jsonl")]
    threads = torch.get_num_threads()
    try:
        assert loader_rate.main(flags) == 0
    finally:
        torch.set_num_threads(threads)
    env, *splits = (json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines())
    assert env["torch_threads"] == 1
    assert [(s["split"], s["augment"], s["images_timed"]) for s in splits] == [("train", True, 2), ("crossvali", False, 2)]
    assert all(s["images_per_s"] > 0 for s in splits)
    assert seen == [(True, (508, 508))] * 3 + [(False, (508, 508))] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


# What the authors' train_deep_globe.py printed at the end of a mode-3 evaluation (their code,
# run by bench/authors_side_by_side.py on 2026-11-30): NumPy arrays wrapped over lines.
AUTHORS_LOG_TAIL = """val:[1.95383336e-05 0.00000000e+00 5.79158603e-02 1.82807327e-02
 0.00000000e+00 3.06604245e-03 1.25866498e-01]
Local train:[nan nan nan nan nan nan nan]
Local val:[3.90164083e-02 8.14061843e-03 0.00000000e+00 0.00000000e+00
 2.54868289e-03 7.45825331e-03 2.15345522e-05]
Global train:[nan nan nan nan nan nan nan]
Global val:[0.0908409  0.         0.         0.         0.08403608 0.02006381
 0.00046111]
================================
"""

# Stands in for a clone of the authors' code: it records what it finds where their
# evaluation would look, and prints IoU lines as theirs does.
FAKE_AUTHORS_MAIN = '''
import json, os, sys
import torch
import helper
args = sys.argv[1:]
flag = lambda name: args[args.index(name) + 1]
data, models = flag("--data_path"), flag("--model_path")
try:
    import config  # LUNGseg's, which the clone does not have
    ours_found = True
except ImportError:
    ours_found = False
seen = {"helper": helper.WHO, "ours_found": ours_found, "cwd": os.getcwd(), "argv0": sys.argv[0],
        "gpus_visible": os.environ["CUDA_VISIBLE_DEVICES"], "bytecode": os.environ["PYTHONDONTWRITEBYTECODE"],
        "tensor_cuda": torch.zeros(1).cuda().device.type,
        "module_cuda": next(torch.nn.Linear(1, 1).cuda().parameters()).device.type,
        "train": os.listdir(os.path.join(data, "train", "Sat")), "train_labels": os.listdir(os.path.join(data, "train", "Label")),
        "offical_crossvali": os.path.isdir(os.path.join(data, "offical_crossvali", "Sat")),
        "imagenet": os.path.isfile(os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "resnet50-19c8e357.pth")),
        "checkpoint_keys": len(torch.load(os.path.join(models, flag("--path_l2g")))),
        "threads": os.environ["OMP_NUM_THREADS"], "mode": flag("--mode"), "evaluation": "--evaluation" in args,
        "log_path_exists": os.path.isdir(flag("--log_path"))}
with open("seen.jsonl", "a") as f:
    f.write(json.dumps(seen) + "\\n")
print("val:[0.   0.5\\n 0.25]")
print("Local val:[1. 0. 0.]")
print("Global val:[0.125 0.  0. ]")
'''


def test_authors_iou_reads_their_wrapped_numpy_lines():
    from bench.authors_side_by_side import authors_iou

    iou = authors_iou("epoch [1/120] IoU: train = 0.0000, val = 0.0342\n" + AUTHORS_LOG_TAIL)
    assert iou["ensemble"] == [1.95383336e-05, 0.0, 5.79158603e-02, 1.82807327e-02, 0.0, 3.06604245e-03, 1.25866498e-01]
    assert iou["local"][4:] == [2.54868289e-03, 7.45825331e-03, 2.15345522e-05]
    assert iou["global"] == [0.0908409, 0.0, 0.0, 0.0, 0.08403608, 0.02006381, 0.00046111]
    with pytest.raises(RuntimeError, match="Global val"):
        authors_iou(AUTHORS_LOG_TAIL.replace("Global val", "Global"))


def fake_authors_clone(folder):
    (folder / "models").mkdir(parents=True)
    (folder / "train_deep_globe.py").write_text(FAKE_AUTHORS_MAIN)
    (folder / "helper.py").write_text("WHO = 'authors'\n")  # ours has the same name
    (folder / "models" / "fpn_global_local_fmreg_ensemble.py").write_text("")
    return folder


def test_side_by_side_runs_their_entry_point_on_the_cpu_and_ours_in_turns(tmp_path, capsys, monkeypatch):
    from bench import authors_side_by_side

    clone = fake_authors_clone(tmp_path / "GLNet")
    monkeypatch.setattr(authors_side_by_side, "AUTHORS_IMPORTS", {})  # the fake imports only torch
    out = tmp_path / "r.jsonl"
    flags = ["--authors", str(clone), "--size", "128", "--size_g", "96", "--rounds", "2", "--threads", "1",
             "--lungseg_flags", "", "--folder", str(tmp_path / "scratch"), "--json", str(out)]
    assert authors_side_by_side.main(flags) == 0
    environment, *runs, authors, ours = (json.loads(line) for line in out.read_text().splitlines())
    assert environment["commit"] and environment["authors_commit"] is None and len(environment["authors_sha256"]) == 16
    assert [(r["round"], r["code"]) for r in runs] == [(0, "authors"), (0, "lungseg"), (1, "authors"), (1, "lungseg")]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in runs)
    assert runs[0]["iou"] == {"ensemble": [0.0, 0.5, 0.25], "local": [1.0, 0.0, 0.0], "global": [0.125, 0.0, 0.0]}
    assert len(runs[1]["iou"]["ensemble"]) == 7  # DeepGlobe's classes, from our evaluation file
    assert authors["summary"] == "authors" and authors["time_vs_authors"] == 1.0
    assert ours["summary"] == "lungseg" and ours["runs"] == 2 and ours["iou_equals_authors"] is False
    median = lambda code, key: statistics.median(r[key] for r in runs if r["code"] == code)
    assert ours["time_vs_authors"] == pytest.approx(median("lungseg", "seconds") / median("authors", "seconds"), abs=1e-3)
    assert ours["rss_vs_authors"] == pytest.approx(median("lungseg", "peak_rss_mb") / median("authors", "peak_rss_mb"),
                                                   abs=1e-3)
    seen = [json.loads(line) for line in (clone / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 2
    assert seen[0] == {
        "helper": "authors", "ours_found": False, "cwd": str(clone), "argv0": str(clone / "train_deep_globe.py"),
        "gpus_visible": "", "bytecode": "1",
        "tensor_cuda": "cpu", "module_cuda": "cpu",
        "train": ["democrossvali000_sat.jpg"], "train_labels": ["democrossvali000_mask.png"], "offical_crossvali": True,
        "imagenet": True, "checkpoint_keys": seen[0]["checkpoint_keys"], "threads": "1", "mode": "3",
        "evaluation": True, "log_path_exists": True}
    assert seen[0]["checkpoint_keys"] > 100
    assert not list(clone.rglob("__pycache__"))  # their clone is left as it was
    assert list((tmp_path / "scratch").iterdir()) == []  # its temporary folder is gone


def test_side_by_side_needs_a_clone_of_the_authors_code_and_its_imports(tmp_path, monkeypatch):
    from bench import authors_side_by_side

    with pytest.raises(SystemExit, match="VITA-Group/GLNet"):
        authors_side_by_side.main(["--authors", str(tmp_path)])
    monkeypatch.setattr(authors_side_by_side, "AUTHORS_IMPORTS", {"json": "json", "no_such_module_x": "no-such-x"})
    with pytest.raises(SystemExit, match="pip install no-such-x$"):
        authors_side_by_side.main(["--authors", str(fake_authors_clone(tmp_path / "GLNet"))])


def test_authors_code_id_names_a_commit_only_for_a_checkout_of_its_own(tmp_path):
    from bench.authors_side_by_side import authors_code_id

    outer = tmp_path / "outer"
    clone = fake_authors_clone(outer / "GLNet")
    git = lambda folder, *args: subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                               check=True).stdout.strip()
    before = authors_code_id(clone)
    assert before["authors_commit"] is None
    git(outer, "init", "-q")
    assert authors_code_id(clone)["authors_commit"] is None  # a copy inside another checkout
    git(clone, "init", "-q")
    git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    assert authors_code_id(clone)["authors_commit"] == git(clone, "rev-parse", "HEAD")
    (clone / "utils").mkdir()
    (clone / "utils" / "metrics.py").write_text("# scores\n")
    assert authors_code_id(clone)["authors_sha256"] != before["authors_sha256"]  # every .py counts


def test_same_iou_is_equality_as_far_as_numpy_prints_it():
    from bench.authors_side_by_side import same_iou

    nan = float("nan")
    theirs = {"ensemble": [nan, 0.0908409], "local": [0.0], "global": [1.95383336e-05]}
    ours = {"ensemble": [nan, 0.09084090492925394], "local": [0.0], "global": [1.9538333599950176e-05]}
    assert same_iou(ours, theirs)
    assert not same_iou({**ours, "ensemble": [nan, 0.0908410]}, theirs)
    assert not same_iou({**ours, "ensemble": [0.0, 0.0908409]}, theirs)
    assert not same_iou({**ours, "local": [0.0, 0.0]}, theirs)
