"""Segment one image, or every image of a folder, with a trained GLNet stage.

    python predict.py --mode 3 --model_path saved_models --input IMAGE_OR_FOLDER --output DIR

Writes <stem>_mask.png (the class colours) and <stem>_ids.png (class ids, 8-bit grey) per
image into --output, replacing files of those names: predictions are cheap to regenerate.
Images that cannot be read are skipped, named, and make the exit status 2.

Very large images (tiled or pyramidal TIFF, GeoTIFF, whole-slide images such as .svs) are
read region by region and predicted band by band into <stem>_ids.tif (a tiled pyramidal
TIFF of class ids with the class colours as its palette, georeferenced like the input)
and <stem>_preview.png. An interrupted run keeps the bands done; the same command
continues from there.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

import band_prediction
import config
import helper
from config import (USER_ERRORS, ConfigError, Settled, add_device_flags, add_size_flags, check_args, checkpoint_paths,
                    default_checkpoint, settle_flags)
from dataset.classes import ClassTable
from dataset.large_files import LARGE_IMAGE_SUFFIXES, is_large_image_file, open_large_image
from dataset.layouts import IMAGE_SUFFIXES, index_files
from dataset.prediction_files import host_threads, output_names, segment_files
from models.backbone import BACKBONES
from models.stages import CHECKPOINT_FLAGS, STAGES, SUB_BATCH_SIZE, Stage
from utils.errors import DataError, OneLineParser, USAGE_ERROR, reports_errors
from utils.files import RunLock, remove_temporaries, replacing
from utils.folders import output_folder, removed_if_failed
from utils.georef import world_file, world_file_name
from utils.memory import return_large_blocks_to_the_system
from utils.patches import PatchGrid
from utils.progress import progress
from utils.signals import exit_status, stop_word, terminate_as_interrupt
from utils.tiled_writer import ClassMapWriter, file_identity, partial_paths


# A folder's files that are segmented: the training layouts' images and every very large kind.
PREDICT_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + LARGE_IMAGE_SUFFIXES))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--input", required=True, help="an image (any format Pillow reads, or a very large one, see above), or a folder "
      f"whose {', '.join(PREDICT_SUFFIXES)} files are all segmented")
    a("--output", required=True, help="folder for <stem>_mask.png and <stem>_ids.png (created; existing files "
      "of those names are overwritten)")
    a("--mode", type=int, choices=[1, 2, 3], default=3, help="stage whose weights predict: 1 global, 2 global-to-local, "
      "3 local-to-global (GLNet) (default: 3)")
    a("--model_path", default="saved_models", help="folder of the checkpoints; --path_* names are taken inside it "
      "(default: saved_models)")
    for flag, stage in CHECKPOINT_FLAGS.items():
        a(f"--{flag}", default=default_checkpoint(stage), help=f"stage-{int(stage)} checkpoint (default: %(default)s)")
    add_size_flags(p)
    a("--micro_batch_size", type=int, default=None, help="patches per forward pass of the local branch (memory vs "
      f"speed; results do not depend on it; default: 1 on the CPU, {SUB_BATCH_SIZE} on a GPU)")
    add_device_flags(p)
    a("--tta", action="store_true", help="test-time augmentation: 4 rotations x 2 flips (8 times slower; not for "
      "very large images, which are predicted band by band)")
    a("--exact_global", action="store_true", help="very large images: make the global image from full resolution "
      "(one extra read of the whole image; equal to the in-memory path's) instead of from the smallest pyramid level "
      "at least 4 times --size_g on both sides (the default where the file has one; slightly different pixels)")
    a("--classes", default=None, help="class table JSON (default: the checkpoint's, else DeepGlobe's 7 classes)")
    a("--backbone", choices=BACKBONES, default=None, help="must match the checkpoints (default: "
      "the checkpoint's, else resnet50)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def as_trainer_args(args: argparse.Namespace) -> argparse.Namespace:
    """predict's flags over the trainer's evaluation defaults. The flags both have mean the
    same, so the trainer's own checks and class-table choice apply to predict unchanged."""
    return argparse.Namespace(**{**vars(config.parse_args(["--evaluation"])), **vars(args)})


def find_images(path: Path) -> list[Path]:
    """The image itself, or the images of a folder sorted by name.

    Raises:
        DataError: no such path, a folder without images, or two images with one stem
            (their outputs would overwrite each other).
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image or folder; check --input")
    images = index_files(path, PREDICT_SUFFIXES)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(PREDICT_SUFFIXES)}) in this folder; check --input")
    return list(images.values())


def build_session(args: argparse.Namespace, settled: Settled) -> helper.Session:
    """The stage's evaluation weights loaded from the checkpoints the flags name (args:
    as_trainer_args of predict's flags)."""
    stage = Stage(args.mode)
    paths = checkpoint_paths(args)
    model, frozen = helper.build_models(stage, settled.table.n_class, training=False, paths=paths,
                                        backbone=args.backbone, device=torch.device(args.device))
    warning = helper.frozen_context_warning(settled.facts, helper.frozen_digest(frozen), paths)
    if warning is not None:
        print(warning, file=sys.stderr)
    return helper.make_session(stage, model, frozen, settled.table, args, torch.device(args.device), inference=True)


def run(args: argparse.Namespace) -> int:
    args = as_trainer_args(args)
    images = find_images(Path(args.input))  # the input before the checkpoints: it is the likelier slip
    if Path(args.input).is_dir() and Path(args.output).resolve() == Path(args.input).resolve():
        raise ConfigError(f"--output {args.output} is the --input folder, where a later run would take the predictions "
                          "for images to segment; write them to another folder")
    settled = settle_flags(args)
    table = settled.table
    check_args(args, table)
    for note in settled.notes:
        print(note, file=sys.stderr)
    kinds = {path: is_large_image_file(path) for path in images}
    large, small = [path for path in images if kinds[path]], [path for path in images if not kinds[path]]
    if large and args.tta:
        raise DataError(f"{large[0]}: --tta cannot be used on very large images (predicted band by band, while "
                        "test-time augmentation turns the whole image); leave out --tta")
    with removed_if_failed(args.output):  # a refused run leaves no empty --output behind
        output = output_folder(args.output, "--output")
        # Locked before the models load: a second run on this folder stops at once, not seconds later.
        with RunLock(output / ".predict", f"--output {output}", "choose another --output"):
            session = build_session(args, settled)
            if args.compile:
                print(helper.COMPILE_NOTE, file=sys.stderr)
            remove_temporaries(output, [name for path in small for name in output_names(path.stem)]
                               + [name for path in large for name in large_output_names(path.stem)]
                               + [world_file_name(large_output_names(path.stem)[0]) for path in large]
                               + [p.name for path in large for p in partial_paths(output / f"{path.stem}_ids.tif")])
            alone = len(images) == 1
            skipped = segment_all(session, small, table, output, tta=args.tta, alone=alone) if small else []
            skipped += segment_large(session, large, table, output, args, alone=alone)
    print(f"wrote the predictions of {len(images) - len(skipped)} image(s) to {output}")
    if skipped:
        # Each was named with its reason as it was skipped; the last line counts them.
        print(f"error: skipped {len(skipped)} image(s) that could not be read (see above)", file=sys.stderr)
        return USAGE_ERROR
    return 0


def patch_bar(session: helper.Session, image: Tensor, tta: bool, name: str) -> tqdm:
    """A bar over the patches of one image (every transform of it under --tta), shown on a
    terminal while an image takes more than one pass."""
    def patches(height: int, width: int) -> int:
        return 0 if session.stage is Stage.GLOBAL else len(PatchGrid.build((height, width), session.size_p))

    h, w = image.shape[-2:]
    # Under --tta half the transforms turn the image a quarter, and H x W becomes W x H.
    total = 4 * (patches(h, w) + patches(w, h)) if tta else patches(h, w)
    return tqdm(total=total, desc=name, unit="patch", leave=False, position=1, dynamic_ncols=True,
                disable=None if total > session.micro_batch else True)


def segment_all(session: helper.Session, images: Sequence[Path], table: ClassTable, output: Path,
                tta: bool, alone: Optional[bool] = None) -> list[DataError]:
    """Segment and write every image; returns the errors of those that could not be read
    (an image given alone raises its error; alone: whether it was, default: one image)."""
    def segment(path: Path, image: Tensor) -> Tensor:
        with patch_bar(session, image, tta, path.name) as passes:
            return helper.predict_image(dataclasses.replace(session, on_patches=passes.update), image, tta)

    return segment_files(images, segment, table, output, host_threads(session.device),
                         len(images) == 1 if alone is None else alone)


def large_output_names(stem: str) -> tuple[str, str]:
    return f"{stem}_ids.tif", f"{stem}_preview.png"


def large_identity(args: argparse.Namespace, path: Path) -> dict:
    """What a very large image's class map depends on: the input file, the checkpoint
    files, the settings that change results (to the last bit: device kind, arithmetic,
    memory format, patches per pass) and the code. A partial map of another identity is
    started over, not resumed, so no map joins bands computed two ways."""
    paths = checkpoint_paths(args)
    return {"input": file_identity(path),
            "checkpoints": {flag: file_identity(paths[flag]) for flag in STAGES[Stage(args.mode)].reads(False)},
            "mode": args.mode, "size_g": list(args.size_g), "size_p": list(args.size_p), "amp": args.amp,
            "global": "exact" if args.exact_global else "level", "device": torch.device(args.device).type,
            "cuda_math": args.cuda_math, "channels_last": args.channels_last, "compile": args.compile,
            "micro_batch_size": args.micro_batch_size, "torch": torch.__version__, "code": helper.code_version()}


def segment_large(session: helper.Session, images: Sequence[Path], table: ClassTable, output: Path,
                  args: argparse.Namespace, alone: bool) -> list[DataError]:
    """Segment very large images band by band into <stem>_ids.tif and <stem>_preview.png;
    returns the errors of those that could not be read (an image given alone raises its
    error). An interruption keeps the finished bands, which the same command resumes from."""
    if images:
        # Tiles, patches and logits of every band come and go: in glibc's heap they fragment
        # it, and the peak grew with the image's width (bench/README.md, "Very large images
        # end to end"). After the small images, which gain little and would run slower.
        return_large_blocks_to_the_system()
    skipped = []
    for k, path in enumerate(images):
        start = time.perf_counter()
        try:
            shown = segment_large_image(session, path, table, output, args)
        except DataError as error:
            if alone:
                raise
            skipped.append(error)
            print(f"skipped: {error}", file=sys.stderr)
            continue
        if not shown:  # no bar in a log or a pipe: a line per image instead
            print(f"{path.name}: {time.perf_counter() - start:.1f} s ({k + 1}/{len(images)})", file=sys.stderr)
    return skipped


def segment_large_image(session: helper.Session, path: Path, table: ClassTable, output: Path,
                        args: argparse.Namespace) -> bool:
    """One very large image (see segment_large); returns whether a progress bar showed."""
    ids_name, preview_name = large_output_names(path.stem)
    with open_large_image(path) as image:
        for line in image.damaged:
            print(f"warning: {line}", file=sys.stderr)
        height, width = image.size
        writer = ClassMapWriter(output / ids_name, (height, width), large_identity(args, path), table.colours,
                                preview=output / preview_name, georef=image.georef, mpp=image.mpp)
        try:
            kept = first_pass_done(session, writer)
            if writer.started_over is not None:
                reason = started_over_reason(*writer.started_over, height)
                print(f"{path.name}: starting over: {reason}", file=sys.stderr)
            if writer.rows_done:
                print(f"{path.name}: continuing from row {writer.rows_done} of {height}", file=sys.stderr)
            elif kept:
                print(f"{path.name}: continuing the pass over every patch after the {kept} kept", file=sys.stderr)
            # Rows advance only as bands are written, and stage 3 passes over every patch before
            # its first band: a second bar over patches shows that work and its time left.
            patches = band_prediction.band_patch_count(session, (height, width), writer.rows_done, kept)
            terminal = sys.stderr.isatty()
            with progress(height, path.name, "row", initial=writer.rows_done, terminal=terminal) as bar, \
                    progress(patches, "patches", "patch", inner=True, bar=patches > session.micro_batch,
                             terminal=terminal) as passes:
                band_prediction.predict_large(dataclasses.replace(session, on_patches=passes.update), image, writer,
                                              exact_global=args.exact_global, on_band=bar.update)
                writer.finish()
            carry_world_file(path, output / ids_name, image.georef is not None)
            return terminal
        except KeyboardInterrupt:
            patches = 0 if writer.rows_done else first_pass_done(session, writer)
            kept = f" and {patches} patches of the pass over every patch" if patches else ""
            print(f"{path.name}: {writer.rows_done} of {height} rows{kept} are kept; the same command continues from "
                  "there", file=sys.stderr)
            raise
        finally:
            writer.close()


def started_over_reason(rows: int, differing: Sequence[str], height: int) -> str:
    """Why an earlier run's work on a map was deleted, from ClassMapWriter.started_over
    and large_identity's keys."""
    names = {"input": "the input file", "checkpoints": "the checkpoints", "code": "the code version",
             "torch": "the torch version", "global": "--exact_global"}
    what = f"{rows} of {height} rows" if rows else "its pass over every patch"
    if not differing:
        return f"the {what} an earlier run kept could not be read back (damaged on disk)"
    changed = ", ".join(names.get(key, f"--{key}") for key in differing)
    return f"{changed} changed since an earlier run kept {what}"


def first_pass_done(session: helper.Session, writer: ClassMapWriter) -> int:
    """The patches of stage 3's pass over every patch that a stopped run kept (0: none)."""
    kept = band_prediction.kept_first_pass(session, writer)
    return kept[1] if kept is not None else 0


def carry_world_file(source: Path, map_path: Path, georeferenced: bool) -> None:
    """A world file beside a plain TIFF (x.tfw) places the class map as well, which has the
    same pixel grid: copied beside it under the name GDAL reads for it (x_ids.tfw). A
    GeoTIFF's own tags are already in the map and take precedence in GDAL, so theirs stay."""
    world = None if georeferenced else world_file(source)
    target = map_path.parent / world_file_name(map_path.name)
    if world is None:
        target.unlink(missing_ok=True)  # an earlier run's would misplace this map
        return
    with replacing(target) as tmp:
        shutil.copyfile(world, tmp)


@reports_errors(*USER_ERRORS)
def main(argv: Optional[Sequence[str]] = None) -> int:
    terminate_as_interrupt()
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt as interrupt:
        print(f"{stop_word(interrupt)}: the images before the one in progress have their predictions", file=sys.stderr)
        return exit_status(interrupt)


if __name__ == "__main__":
    sys.exit(main())
