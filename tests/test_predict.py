"""predict.py end to end on tiny generated images with ResNet-18 checkpoints."""
import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import config
import helper
import predict
import utils.cores
from dataset import prediction_files
from dataset.classes import DEEPGLOBE
from models.glnet import GLNet, GlobalBranch
from models.stages import Stage
from utils.errors import DataError, WriteError

# Small sizes keep a mode-3 run to a few seconds on two cores.
SIZES = ["--size_g", "64", "--size_p", "96", "--micro_batch_size", "4", "--backbone", "resnet18"]
# (H, W) of the generated images, by name: non-square RGB, 16-bit grey, RGBA smaller than a patch.
IMAGES = {"rgb": (100, 150), "grey16": (90, 70), "small_rgba": (40, 60)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (h, w), (gh, gw), (sh, sw) = IMAGES.values()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    grey16 = rng.integers(0, 65536, (gh, gw), dtype=np.uint16)
    # frombytes names the 16-bit mode explicitly; fromarray's choice differs between Pillow versions.
    Image.frombytes("I;16", (gw, gh), grey16.astype("<u2").tobytes()).save(folder / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (sh, sw, 4), dtype=np.uint8)).save(folder / "small_rgba.tif")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def run(models: Path, *args: str) -> int:
    return predict.main(["--model_path", str(models), "--device", "cpu", *SIZES, *args])


def check_outputs(folder: Path, names: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Both files exist per image with the image's size, ids are classes, colours are the
    palette's colours of those ids. Returns the id maps."""
    palette = np.asarray(DEEPGLOBE.colours, dtype=np.uint8)
    found = {}
    for name, (h, w) in names.items():
        ids_png, mask_png = Image.open(folder / f"{name}_ids.png"), Image.open(folder / f"{name}_mask.png")
        assert ids_png.mode == "L" and mask_png.mode == "RGB"
        ids, mask = np.asarray(ids_png), np.asarray(mask_png)
        assert ids.shape == (h, w) and mask.shape == (h, w, 3)
        assert ids.max() < DEEPGLOBE.n_class
        np.testing.assert_array_equal(mask, palette[ids])
        found[name] = ids
    return found


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_mode3_folder_writes_ids_and_colours_and_overwrites(models, images, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    out.mkdir(parents=True)
    (out / "rgb_mask.png").write_bytes(b"stale")
    assert run(models, "--mode", "3", "--input", str(images), "--output", str(out)) == 0
    check_outputs(out, IMAGES)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_{k}.png" for n in IMAGES for k in ("ids", "mask"))
    assert "3 image(s)" in capsys.readouterr().out


def test_mode1_single_image_and_channels_last_agree(models, images, tmp_path):
    plain, nhwc = tmp_path / "plain", tmp_path / "nhwc"
    for out, extra in ((plain, []), (nhwc, ["--channels_last"])):
        assert run(models, "--mode", "1", "--input", str(images / "rgb.jpg"), "--output", str(out), *extra) == 0
    a, b = check_outputs(plain, {"rgb": IMAGES["rgb"]})["rgb"], check_outputs(nhwc, {"rgb": IMAGES["rgb"]})["rgb"]
    # Same weights, another memory layout: only float rounding may differ.
    assert (a == b).mean() > 0.99


def test_tta_runs_on_a_non_square_image(models, images, tmp_path):
    assert run(models, "--mode", "1", "--tta", "--input", str(images / "rgb.jpg"), "--output", str(tmp_path)) == 0
    check_outputs(tmp_path, {"rgb": IMAGES["rgb"]})


class _HostToDevice(TorchDispatchMode):
    """Records the operators that take a CPU tensor and return one on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type != "cpu" for t in outputs):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_only_the_image_crosses_to_the_device_once_tables_are_made(mode):
    """On a GPU, copying a tensor made on the host (an index table, say) waits for all the
    queued work. From the second image of a size on, only the image itself may cross. The
    meta device stands in for a GPU: it runs no arithmetic but sees every transfer."""
    stage = Stage(mode)
    model, frozen = GLNet(DEEPGLOBE.n_class, "resnet18"), GlobalBranch(DEEPGLOBE.n_class, "resnet18")
    args = predict.as_trainer_args(predict.parse_args(["--input", "-", "--output", "-", "--device", "meta", *SIZES]))
    session = helper.make_session(stage, model, frozen if mode == 3 else None, DEEPGLOBE, args, torch.device("meta"),
                                  inference=True)
    image = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    helper.predict_image(session, image)
    with _HostToDevice() as transfers:
        ids = helper.predict_image(session, image)
    assert ids.device.type == "meta" and ids.shape == (150, 200)
    assert transfers.copies == ["aten._to_copy.default"]


@pytest.mark.parametrize("mode, tta", [(2, False), (3, False), (3, True)])
def test_progress_hears_of_every_patch_of_every_pass_and_the_cpu_trims_the_heap_after_each(mode, tta, monkeypatch):
    stage = Stage(mode)
    model, frozen = GLNet(DEEPGLOBE.n_class, "resnet18"), GlobalBranch(DEEPGLOBE.n_class, "resnet18")
    args = predict.as_trainer_args(predict.parse_args(["--input", "-", "--output", "-", *SIZES]))
    session = helper.make_session(stage, model, frozen if mode == 3 else None, DEEPGLOBE, args, torch.device("cpu"),
                                  inference=True)
    told: list = []
    monkeypatch.setattr(helper, "release_free_heap", lambda: told.append("trim"))
    image = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    helper.predict_image(dataclasses.replace(session, on_patches=told.append), image, tta)
    # 150 x 200 in 96-px patches overlapping by at least 50 px: 3 rows x 4 columns, passed
    # --micro_batch_size 4 at a time, each pass followed by a trim.
    passes = 3 * (8 if tta else 1)
    assert told == [4, "trim"] * passes
    told.clear()
    dataclasses.replace(session, device=torch.device("meta"), on_patches=told.append).after_pass(4)
    assert told == [4]  # a GPU's host heap is left alone


def test_without_a_terminal_each_image_gets_a_line(models, images, tmp_path, capsys):
    assert run(models, "--mode", "2", "--input", str(images), "--output", str(tmp_path)) == 0
    err = capsys.readouterr().err
    for k, name in enumerate(sorted(p.name for p in images.iterdir() if p.suffix != ".txt")):
        assert re.search(rf"^{re.escape(name)}: \d+\.\d s \({k + 1}/3\)$", err, re.MULTILINE), err


def test_use_channels_last_converts_both_networks():
    model, frozen = GLNet(DEEPGLOBE.n_class, "resnet18"), GlobalBranch(DEEPGLOBE.n_class, "resnet18")
    helper.use_channels_last(model, frozen)
    for net in (model, frozen):
        for name, p in net.named_parameters():
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=torch.channels_last), name


def test_missing_checkpoint_is_one_line_and_leaves_no_empty_output_folder(models, images, tmp_path, capsys):
    out = tmp_path / "preds" / "run1"
    code = run(models, "--mode", "3", "--path_l2g", "nope.pth", "--input", str(images), "--output", str(out))
    assert code == 2
    assert "nope.pth: not found" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # neither folder it made for the run
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert run(models, "--mode", "3", "--path_l2g", "nope.pth", "--input", str(images), "--output",
               str(tmp_path / "kept")) == 2
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"  # a folder that was there stays, as it was


def test_checkpoint_flag_naming_a_folder_says_so(models, images, tmp_path, capsys):
    (models / "a_folder").mkdir(exist_ok=True)
    code = run(models, "--mode", "3", "--path_l2g", "a_folder", "--input", str(images), "--output", str(tmp_path))
    assert code == 2
    assert "a_folder: a folder, not a file" in one_error_line(capsys)


def test_output_that_cannot_be_a_folder_is_one_line(models, images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for output, message in ((blocker, "a file is in the way"), (blocker / "below", "cannot create this folder")):
        assert run(models, "--mode", "1", "--input", str(images), "--output", str(output)) == 2
        assert f"--output {output}: {message}" in one_error_line(capsys)


def test_output_into_the_input_folder_is_refused(models, images, tmp_path, capsys):
    """A later run on the folder would segment the predictions as images (x_mask_mask.png)."""
    before = sorted(images.iterdir())
    assert run(models, "--mode", "1", "--input", str(images), "--output", str(images / ".." / images.name)) == 2
    assert "is the --input folder" in one_error_line(capsys)
    assert sorted(images.iterdir()) == before
    one = tmp_path / "one.png"
    shutil.copy(before[0], one)
    assert run(models, "--mode", "1", "--input", str(one), "--output", str(tmp_path)) == 0  # one image: beside it
    assert (tmp_path / "one_ids.png").exists()


def test_missing_input_and_empty_folder_are_one_line(models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(models, "--input", str(empty), "--output", str(tmp_path / "o")) == 2
    assert "no images" in one_error_line(capsys)
    assert run(models, "--input", str(tmp_path / "absent.png"), "--output", str(tmp_path / "o")) == 2
    assert "no such image or folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_corrupt_image_is_one_line(models, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert run(models, "--mode", "1", "--input", str(bad), "--output", str(tmp_path / "o")) == 2
    assert "broken.png" in one_error_line(capsys)


@pytest.mark.parametrize("depth", [1, 3])
def test_read_ahead_keeps_order_with_depth_reads_in_flight(depth):
    import time
    from concurrent.futures import ThreadPoolExecutor

    started = []

    def read(path: Path) -> torch.Tensor:
        started.append(path.name)
        if path.name == "2.png":
            raise DataError("2.png: unreadable")
        return torch.tensor([int(path.stem)])

    paths = [Path(f"{i}.png") for i in range(6)]
    with ThreadPoolExecutor(depth) as pool:
        for k, (path, image) in enumerate(prediction_files.read_ahead(pool, paths, read, depth=depth)):
            assert path == paths[k]
            if k == 2:
                assert isinstance(image, DataError) and str(image) == "2.png: unreadable"
            else:
                assert image.item() == k
            # While the caller holds image k, the next `depth` reads start, and no more.
            ahead = min(len(paths), k + 1 + depth)
            deadline = time.monotonic() + 5
            while len(started) < ahead and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(started) == ahead
    assert sorted(started) == [p.name for p in paths]
    with ThreadPoolExecutor(depth) as pool:
        assert list(prediction_files.read_ahead(pool, [], read, depth=depth)) == []


def test_several_writers_write_every_image_once_with_at_most_that_many_in_flight(images, tmp_path, monkeypatch):
    import threading
    import time

    rng = np.random.default_rng(1)
    paths = sorted(p for p in images.iterdir() if p.suffix != ".txt")
    maps = {p: torch.from_numpy(rng.integers(0, DEEPGLOBE.n_class, IMAGES[p.stem], dtype=np.uint8)) for p in paths}
    seen, written, in_flight, most = [], [], [0], [0]
    lock = threading.Lock()
    write = prediction_files.write_prediction

    def slow_write(ids, table, output, stem):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.1)  # the main thread hands over the next images meanwhile
        write(ids, table, output, stem)
        with lock:
            in_flight[0] -= 1
            written.append(stem)

    def segment(path: Path, image: torch.Tensor) -> torch.Tensor:
        seen.append(path)
        assert image.shape[-2:] == IMAGES[path.stem]  # the image of that path, read ahead
        return maps[path]

    monkeypatch.setattr(prediction_files, "write_prediction", slow_write)
    skipped = prediction_files.segment_files(paths, segment, DEEPGLOBE, tmp_path, prediction_files.HostThreads(read=2, write=2),
                                    alone=False)
    assert skipped == [] and seen == paths
    assert sorted(written) == sorted(p.stem for p in paths) and most[0] == 2
    found = check_outputs(tmp_path, IMAGES)
    for path in paths:
        np.testing.assert_array_equal(found[path.stem], maps[path].numpy())


def test_a_write_that_fails_stops_the_run_with_its_error(images, tmp_path, monkeypatch):
    paths = sorted(p for p in images.iterdir() if p.suffix != ".txt")

    def failing_write(ids, table, output, stem):
        if stem == paths[0].stem:
            raise WriteError(f"{stem}: disk full")

    monkeypatch.setattr(prediction_files, "write_prediction", failing_write)
    with pytest.raises(WriteError, match="disk full"):
        prediction_files.segment_files(paths, lambda path, image: torch.zeros(IMAGES[path.stem], dtype=torch.uint8),
                              DEEPGLOBE, tmp_path, prediction_files.HostThreads(read=1, write=3), alone=False)


def test_the_cpu_reads_and_writes_on_one_thread_each():
    assert prediction_files.host_threads(torch.device("cpu")) == prediction_files.HostThreads(read=1, write=1)


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 128])
def test_a_gpu_gets_threads_within_its_cores_and_enough_for_30_images_a_second(cores, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(utils.cores, "CPU_MAX", Path("/nonexistent/cpu.max"))
    threads = prediction_files.host_threads(torch.device("cuda"))
    assert threads.read >= 1 and threads.write >= 1
    assert threads.read + threads.write <= max(2, cores - 1)  # one core drives the GPU
    if cores >= 16:
        # One core reads a 2448 x 2448 JPEG in at most 0.10 s and writes both PNGs in at most
        # 0.23 s (bench/results/predict_folder-6b739be-cpu.jsonl); the GPU target is 30 images/s
        # (bench/README.md, Targets).
        assert threads.read / 0.10 >= 30 and threads.write / 0.23 >= 30
        assert threads.read + threads.write <= 12  # no more held in memory than that needs


def test_a_corrupt_image_in_a_folder_is_skipped_named_and_fails_the_run(models, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "c.png")
    assert run(models, "--mode", "1", "--input", str(folder), "--output", str(tmp_path / "o")) == 2
    captured = capsys.readouterr()
    assert "wrote the predictions of 2 image(s)" in captured.out
    assert "skipped 1 image(s)" in captured.err and str(folder / "b.png") in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_ids.png", "a_mask.png", "c_ids.png", "c_mask.png"]


def test_the_cpu_has_bf16_where_the_kernel_lists_bf16_instructions():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    assert config.cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_amp_on_the_cpu_is_bf16_where_the_cpu_has_bf16_instructions(models, images, tmp_path, capsys, monkeypatch):
    rgb = str(images / "rgb.jpg")
    assert run(models, "--amp", "fp16", "--input", rgb, "--output", str(tmp_path / "o")) == 2
    assert "--amp fp16 needs a CUDA device" in one_error_line(capsys)
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    assert run(models, "--amp", "bf16", "--input", rgb, "--output", str(tmp_path / "o")) == 2
    assert "no bf16 instructions (AVX512-BF16 or AMX)" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()

    # Where the CPU lacks them, oneDNN emulates them: slower, the same values.
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    stored, real = [], helper.store_for_inference
    monkeypatch.setattr(helper, "store_for_inference", lambda amp, *nets: stored.append(amp) or real(amp, *nets))
    for name, extra in (("fp32", []), ("bf16", ["--amp", "bf16"])):
        assert run(models, "--mode", "3", "--input", rgb, "--output", str(tmp_path / name), *extra) == 0
    assert stored == [None, torch.bfloat16]
    fp32, bf16 = (check_outputs(tmp_path / name, {"rgb": IMAGES["rgb"]})["rgb"] for name in ("fp32", "bf16"))
    # bf16 keeps about three significant digits: only near-ties may change class.
    assert (fp32 == bf16).mean() > 0.98


def test_bad_sizes_use_the_trainers_rules(models, images, tmp_path, capsys):
    assert run(models, "--size_p", "98", "--input", str(images), "--output", str(tmp_path)) == 2
    assert "--size_p 98 must be a multiple of 4" in one_error_line(capsys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mode3_on_cuda_with_amp_and_channels_last(models, images, tmp_path, amp):
    args = ["--mode", "3", "--amp", amp, "--channels_last", "--input", str(images), "--output", str(tmp_path)]
    assert predict.main(["--model_path", str(models), "--device", "cuda", *SIZES, *args]) == 0
    check_outputs(tmp_path, IMAGES)
