"""predict.py on very large images: a tiled TIFF or GeoTIFF is predicted band by
band into <stem>_ids.tif and <stem>_preview.png, equal to the in-memory path's PNG of the
same pixels; an interrupted run resumes. Small files and ResNet-18 keep it to CPU seconds."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from PIL import Image

import band_prediction
import predict
from conftest import DEVICES, write_svs
from dataset.classes import DEEPGLOBE
from dataset.streamed_global import global_image_large
from utils.patches import PatchGrid
import utils.progress
from utils.progress import ProgressLines
from utils.tiled_writer import ClassMapWriter, partial_paths

# One patch per pass: the streamed passes then group patches as the in-memory path does, and
# the maps are equal to the bit (other micro-batches may differ in float rounding). A 4 x 5 grid.
SIZE_P = 128
SIZES = ["--size_g", "64", "--size_p", str(SIZE_P), "--micro_batch_size", "1", "--backbone", "resnet18"]
H, W = 300, 420
CRS = "EPSG:32633"
TRANSFORM = rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4600000.0)


@pytest.fixture(autouse=True)
def keep_the_allocator(monkeypatch):
    """predict.py's setting for very large images would stay for the rest of this process."""
    monkeypatch.setattr(predict, "return_large_blocks_to_the_system", lambda: True)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Smooth shapes with noise, so classes form regions rather than salt and pepper."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([(x * 0.6) % 256, (y * 0.8) % 256, ((x + y) * 0.4) % 256], -1)
    return np.clip(base + rng.normal(0, 20, (H, W, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pixels) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    tifffile.imwrite(folder / "big.tif", pixels, tile=(128, 128), compression="zlib", photometric="rgb", metadata=None)
    (folder / "png").mkdir()
    Image.fromarray(pixels).save(folder / "png" / "big.png")
    with rasterio.open(folder / "geo.tif", "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8", crs=CRS,
                       transform=TRANSFORM, tiled=True, blockxsize=128, blockysize=128, compress="deflate") as ds:
        ds.write(pixels.transpose(2, 0, 1))
    return folder


def run(models: Path, *args: str, device: str = "cpu") -> int:
    return predict.main(["--model_path", str(models), "--device", device, *SIZES, *args])


@pytest.fixture(scope="module")
def in_memory_ids(models, inputs, tmp_path_factory) -> Callable[..., np.ndarray]:
    """The in-memory path's class map of the same pixels (big.png) by mode and device, each
    predicted once for the module."""
    maps: dict[tuple[int, str], np.ndarray] = {}

    def ids(mode: int, device: str = "cpu") -> np.ndarray:
        if (mode, device) not in maps:
            out = tmp_path_factory.mktemp("png")
            assert run(models, "--mode", str(mode), "--input", str(inputs / "png" / "big.png"), "--output", str(out),
                       device=device) == 0
            maps[mode, device] = np.asarray(Image.open(out / "big_ids.png"))
        return maps[mode, device]

    return ids


def check_large_outputs(out: Path, stem: str) -> np.ndarray:
    """The map is a palette TIFF with a pyramid, and the preview is in the class colours;
    returns the map."""
    with tifffile.TiffFile(out / f"{stem}_ids.tif") as tif:
        ids = tif.pages[0].asarray()
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE and tif.pages[0].is_tiled
    assert ids.shape == (H, W) and ids.dtype == np.uint8 and ids.max() < DEEPGLOBE.n_class
    preview = np.asarray(Image.open(out / f"{stem}_preview.png"))
    assert preview.shape == (H, W, 3)
    np.testing.assert_array_equal(preview, np.asarray(DEEPGLOBE.colours, np.uint8)[ids])
    assert not any(p.exists() for p in partial_paths(out / f"{stem}_ids.tif"))
    return ids


# On a GPU too: the large route makes its global image on the CPU and the PNG path on the
# device, which must agree to the bit (Pillow's integer arithmetic, one division).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [3, 1])
def test_tiled_tiff_equals_the_png_path(models, inputs, in_memory_ids, tmp_path, mode, device, capsys):
    out = tmp_path / "large"
    assert run(models, "--mode", str(mode), "--input", str(inputs / "big.tif"), "--output", str(out),
               device=device) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["big_ids.tif", "big_preview.png"]
    ids = check_large_outputs(out, "big")
    np.testing.assert_array_equal(ids, in_memory_ids(mode, device))
    assert len(np.unique(ids)) > 1  # a map of one class would hide a misplaced band


def test_geotiff_keeps_its_georeferencing(models, inputs, tmp_path):
    out = tmp_path / "out"
    assert run(models, "--mode", "1", "--input", str(inputs / "geo.tif"), "--output", str(out)) == 0
    check_large_outputs(out, "geo")
    with rasterio.open(out / "geo_ids.tif") as ds:
        assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM


def test_a_slide_equals_the_png_path_and_its_map_keeps_the_microns_per_pixel(models, pixels, in_memory_ids, tmp_path):
    import openslide

    slide = write_svs(tmp_path / "slide.svs", pixels, 128)
    out = tmp_path / "out"
    assert run(models, "--mode", "2", "--input", str(slide), "--output", str(out)) == 0
    np.testing.assert_array_equal(check_large_outputs(out, "slide"), in_memory_ids(2))
    written = openslide.OpenSlide(str(out / "slide_ids.tif"))  # as QuPath opens it
    try:
        assert float(written.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    finally:
        written.close()


def test_a_world_file_beside_a_plain_tiff_places_the_map_too(models, inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain.tif").write_bytes((inputs / "big.tif").read_bytes())
    # Pixel size 0.5 m, the first pixel's centre at (500000.25, 4599999.75): TRANSFORM's grid.
    (folder / "plain.TFW").write_text("0.5\n0.0\n0.0\n-0.5\n500000.25\n4599999.75\n")
    (folder / "geo.tif").write_bytes((inputs / "geo.tif").read_bytes())
    (folder / "geo.tfw").write_text("1.0\n0.0\n0.0\n-1.0\n0.5\n-0.5\n")  # GeoTIFF tags win in GDAL
    (folder / "bigtiff.btf").write_bytes((inputs / "big.tif").read_bytes())  # a folder's very large kinds count
    out = tmp_path / "out"
    assert run(models, "--mode", "1", "--input", str(folder), "--output", str(out)) == 0
    assert (out / "plain_ids.tfw").read_bytes() == (folder / "plain.TFW").read_bytes()
    assert not (out / "geo_ids.tfw").exists() and not (out / "bigtiff_ids.tfw").exists()
    with rasterio.open(out / "plain_ids.tif") as plain, rasterio.open(out / "geo_ids.tif") as geo:
        assert plain.transform == TRANSFORM and geo.transform == TRANSFORM and geo.crs == rasterio.crs.CRS.from_string(CRS)
    check_large_outputs(out, "bigtiff")
    # Without its world file the input is no longer placed, and neither is a new map of it.
    (folder / "plain.TFW").unlink()
    assert run(models, "--mode", "1", "--input", str(folder / "plain.tif"), "--output", str(out)) == 0
    assert not (out / "plain_ids.tfw").exists()


def test_large_images_get_large_blocks_mapped_apart_and_small_ones_do_not(models, inputs, tmp_path, monkeypatch):
    # What the setting does is tested in test_memory.py and measured in bench/README.md.
    calls = []
    monkeypatch.setattr(predict, "return_large_blocks_to_the_system", lambda: calls.append("set") or True)
    assert run(models, "--mode", "1", "--input", str(inputs / "png"), "--output", str(tmp_path / "png")) == 0
    assert calls == []
    assert run(models, "--mode", "1", "--input", str(inputs / "geo.tif"), "--output", str(tmp_path / "geo")) == 0
    assert calls == ["set"]


def test_tta_is_refused_in_one_line(models, inputs, tmp_path, capsys):
    assert run(models, "--tta", "--input", str(inputs / "big.tif"), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tta" in err and "Traceback" not in err, err


# The same command resumes; other patches per pass (float rounding may differ) start over.
@pytest.mark.parametrize("rerun_flags", [[], ["--micro_batch_size", "2"]], ids=["same", "other-micro-batch"])
def test_interrupted_run_resumes(models, inputs, in_memory_ids, tmp_path, monkeypatch, capsys, rerun_flags):
    monkeypatch.setattr(band_prediction, "BAND_ROWS", 64)
    bands = band_prediction.predict_bands

    def interrupted(*args, **kwargs):
        for k, band in enumerate(bands(*args, **kwargs)):
            if k == 1:
                raise KeyboardInterrupt
            yield band

    out = tmp_path / "out"
    args = ["--mode", "2", "--input", str(inputs / "big.tif"), "--output", str(out)]
    monkeypatch.setattr(band_prediction, "predict_bands", interrupted)
    assert run(models, *args) == 130
    assert "64 of 300 rows are kept" in capsys.readouterr().err
    assert not (out / "big_ids.tif").exists() and not (out / "big_preview.png").exists()
    data, index, state = partial_paths(out / "big_ids.tif")
    assert data.exists() and index.exists() and not state.exists()  # mode 2 has no pass to keep
    monkeypatch.setattr(band_prediction, "predict_bands", bands)
    assert run(models, *args, *rerun_flags) == 0
    err = capsys.readouterr().err
    assert ("continuing from row 64 of 300" in err) == (not rerun_flags)
    started_over = "big.tif: starting over: --micro_batch_size changed since an earlier run kept 64 of 300 rows"
    assert (started_over in err) == bool(rerun_flags), err
    ids = check_large_outputs(out, "big")
    if not rerun_flags:
        np.testing.assert_array_equal(ids, in_memory_ids(2))


def test_a_map_started_over_says_what_changed():
    assert predict.started_over_reason(64, ["amp", "code", "global", "input"], 300) == (
        "--amp, the code version, --exact_global, the input file changed since an earlier run kept 64 of 300 rows")
    assert predict.started_over_reason(0, ["checkpoints"], 300) == (
        "the checkpoints changed since an earlier run kept its pass over every patch")
    assert predict.started_over_reason(64, [], 300) == (
        "the 64 of 300 rows an earlier run kept could not be read back (damaged on disk)")


def test_unreadable_file_is_one_line(models, tmp_path, capsys):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    assert run(models, "--input", str(bad), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.svs" in err and "Traceback" not in err, err


def test_a_tile_that_cannot_be_read_is_one_line_and_the_bands_before_are_kept(models, pixels, tmp_path, monkeypatch,
                                                                               capsys):
    """A read error may pass (network storage): the same command then continues."""
    monkeypatch.setattr(band_prediction, "BAND_ROWS", 64)
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path) as tif:  # a level for the global image, so that full resolution is read by bands
        tif.write(pixels, tile=(128, 128), compression="zlib", photometric="rgb", subifds=1, metadata=None)
        tif.write(pixels[::2, ::2], tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]  # in the last row of tiles
    whole, stat = path.read_bytes(), path.stat()
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(bytes(count))  # not a deflate stream
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same file, read wrongly for now
    written = []
    write_band = ClassMapWriter.write_band
    monkeypatch.setattr(ClassMapWriter, "write_band", lambda self, band: (written.append(len(band)),
                                                                          write_band(self, band)))
    out = tmp_path / "out"
    args = ["--mode", "2", "--size_g", "32", "--input", str(path), "--output", str(out)]
    assert run(models, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and "tile" in err and len(err.splitlines()) == 1, err
    kept = sum(written)
    assert kept and not (out / "big_ids.tif").exists()
    path.write_bytes(whole)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run(models, *args) == 0
    assert f"continuing from row {kept} of {H}" in capsys.readouterr().err
    assert run(models, *args[:-1], str(tmp_path / "whole")) == 0
    np.testing.assert_array_equal(check_large_outputs(out, "big"), check_large_outputs(tmp_path / "whole", "big"))


def test_a_pyramid_level_makes_the_global_image_by_default(models, inputs, pixels, tmp_path, monkeypatch):
    """A pyramidal TIFF whose level 1 (300 x 420, at least 4 x --size_g 64) was made
    inverted, so that a global image taken from it cannot pass for one of full resolution."""
    full = np.tile(pixels, (2, 2, 1))
    level = 255 - full[::2, ::2]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, tile=(128, 128), compression="zlib", photometric="rgb", subifds=1, metadata=None)
        tif.write(level, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1)
    made = []

    def recorded(*args, **kwargs):
        made.append(global_image_large(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(band_prediction, "global_image_large", recorded)
    assert run(models, "--mode", "1", "--input", str(path), "--output", str(tmp_path / "level")) == 0
    expected = np.asarray(Image.fromarray(level).resize((64, 64), Image.Resampling.BILINEAR))  # Pillow, from the level
    assert torch.equal(made[0], torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)
    from_level = tifffile.imread(tmp_path / "level" / "pyramid_ids.tif")
    assert run(models, "--mode", "1", "--exact_global", "--input", str(path), "--output", str(tmp_path / "exact")) == 0
    Image.fromarray(full).save(tmp_path / "pyramid.png")
    assert run(models, "--mode", "1", "--input", str(tmp_path / "pyramid.png"), "--output", str(tmp_path / "png")) == 0
    exact = tifffile.imread(tmp_path / "exact" / "pyramid_ids.tif")
    np.testing.assert_array_equal(exact, np.asarray(Image.open(tmp_path / "png" / "pyramid_ids.png")))
    assert (from_level != exact).any()  # the level's inverted pixels reached the network


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--cuda_math", "fast"], ["--channels_last"], ["--compile"],
                                   ["--micro_batch_size", "2"], ["--exact_global"]],
                         ids=lambda flags: flags[0])
def test_each_setting_that_changes_results_changes_what_a_partial_map_resumes_from(flags, tmp_path):
    """Each changes the predicted values, if only in the last bits (other arithmetic, memory
    format, kernels, grouping of patches, global image): bands computed under one must not
    join a partial map made under another."""
    for name in ("fpn_deepglobe_global.pth", "fpn_deepglobe_local2global.pth"):  # mode 3 reads both
        (tmp_path / name).write_bytes(b"weights")
    (tmp_path / "image.tif").write_bytes(b"pixels")

    def identity(*extra: str) -> dict:
        args = predict.as_trainer_args(predict.parse_args(["--input", str(tmp_path / "image.tif"), "--output", "o",
                                                           "--model_path", str(tmp_path), "--mode", "3",
                                                           "--size_g", "64", "--size_p", "96", *extra]))
        return predict.large_identity(args, tmp_path / "image.tif")

    assert identity(*flags) != identity()
    assert identity() == identity()


def test_in_a_log_progress_is_a_line_now_and_then(models, inputs, tmp_path, monkeypatch, capsys):
    """Where no bar is drawn (stderr is not a terminal under pytest), lines count the rows
    written and, in stage 3, the patches of both passes: the first pass over every patch
    writes no row, so its lines are all there is for a long while."""
    monkeypatch.setattr(band_prediction, "BAND_ROWS", 100)
    monkeypatch.setattr(utils.progress, "EVERY", 0.0)
    assert run(models, "--mode", "3", "--input", str(inputs / "big.tif"), "--output", str(tmp_path)) == 0
    err = capsys.readouterr().err.splitlines()
    rows = [i for i, line in enumerate(err) if line.startswith("big.tif: ") and " row (" in line]
    assert [err[i].split(" (")[0] for i in rows] == ["big.tif: 100/300 row", "big.tif: 200/300 row",
                                                     "big.tif: 300/300 row"]
    patches = [i for i, line in enumerate(err) if line.startswith("patches: ")]
    n = len(PatchGrid.build((H, W), (SIZE_P, SIZE_P)))
    assert [err[i].split(" (")[0] for i in patches] == [f"patches: {k}/{2 * n} patch" for k in range(1, 2 * n + 1)]
    assert patches[n - 1] < rows[0]  # the first pass, before the first row
    assert err[-1].startswith("big.tif: ") and err[-1].endswith(" s (1/1)")  # and the image's time, as before


def test_progress_lines_say_the_count_and_the_time_left_at_most_once_a_minute():
    now = [100.0]
    out = io.StringIO()
    lines = ProgressLines(1000, "slide.svs", "row", initial=100, clock=lambda: now[0], file=out)
    for t, rows in ((30.0, 100), (60.0, 100), (61.0, 50), (3660.0, 100)):
        now[0] = 100.0 + t
        lines.update(rows)
    # 200 rows in the first minute: 700 left at 200 a minute, 3.5 min; at 61 s nothing (a line came
    # at 60 s); after 61 min 350 rows, 550 left at 350 per 61 min, 95.9 min.
    assert out.getvalue().splitlines() == ["slide.svs: 300/1000 row (30 %) after 1 min, about 4 min left",
                                           "slide.svs: 450/1000 row (45 %) after 1 h 1 min, about 1 h 36 min left"]


def test_progress_lines_of_work_of_unknown_size_say_the_count_and_the_last_values_shown():
    now = [0.0]
    out = io.StringIO()
    lines = ProgressLines(None, "train 1", "batch", clock=lambda: now[0], file=out)
    lines.set_postfix(loss="0.5000")
    now[0] = 90.0
    lines.update(3)
    assert out.getvalue() == "train 1: 3 batch after 2 min, loss=0.5000\n"


def test_stage_3s_pass_over_every_patch_resumes_where_it_stopped(models, inputs, in_memory_ids, tmp_path, monkeypatch,
                                                                 capsys):
    """Stopped during that pass, which writes no row, the same command continues it from the
    last patch kept, and the map is the uninterrupted one."""
    monkeypatch.setattr(band_prediction, "FIRST_PASS_EVERY", 0.0)

    class Stopping(ProgressLines):
        def update(self, n: int = 1) -> None:
            super().update(n)
            if self.desc == "patches" and self.n == 5:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    args = ["--mode", "3", "--input", str(inputs / "big.tif"), "--output", str(out)]
    monkeypatch.setattr(utils.progress, "ProgressLines", Stopping)
    assert run(models, *args) == 130
    assert "0 of 300 rows and 4 patches of the pass over every patch are kept" in capsys.readouterr().err
    assert all(p.exists() for p in partial_paths(out / "big_ids.tif"))
    monkeypatch.setattr(utils.progress, "ProgressLines", ProgressLines)
    monkeypatch.setattr(utils.progress, "EVERY", 0.0)
    assert run(models, *args) == 0
    err = capsys.readouterr().err
    n = len(PatchGrid.build((H, W), (SIZE_P, SIZE_P)))
    assert "big.tif: continuing the pass over every patch after the 4 kept" in err
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("patches: ")][-1] == (
        f"patches: {2 * n - 4}/{2 * n - 4} patch")
    np.testing.assert_array_equal(check_large_outputs(out, "big"), in_memory_ids(3))
