"""Reading images and masks into tensors, and writing class-id masks.

Every failure caused by the files themselves is a DataError naming the file.
"""
from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Optional, Union

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch import Tensor

from dataset.classes import ClassTable
from utils.errors import DataError, opening
from utils.files import replacing
from utils.images import class_dtype

PathLike = Union[str, Path]
MaskKind = Literal["ids", "colours"]
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes whose pixels are class ids as they stand ("P": the palette index is the id).
ID_MODES = ("1", "L", "P") + SIXTEEN_BIT_MODES
# Modes that are 8-bit colour or grey once converted to RGB; RGBA and LA lose alpha.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# First band of the grey modes ("1", "L", "LA", "I", "F", "I;16*"): such masks hold grey
# values or class ids, never class colours. Palette masks ("P") are colours and are not here.
GREY_BANDS = ("1", "L", "I", "F")
# How to turn the stored pixels to show them as each EXIF orientation asks (ImageOps.exif_transpose's table;
# 1, or no tag, keeps them). 5 to 8 are quarter turns, which swap height and width.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NotAColourMask(DataError):
    """A single-channel mask read as a colour mask (callers may reword the advice)."""


@contextlib.contextmanager
def _opened(path: PathLike) -> Iterator[Image.Image]:
    """The image at `path`, its header parsed but its pixels not yet decoded. An OSError
    in the body (Pillow's error for a truncated or corrupt file) becomes a DataError."""
    # Pillow refuses images over ~179 megapixels as possible decompression bombs, but
    # ultra-high-resolution images are what this code is for, and they are the user's own
    # files: lift the limit (set here, where every read of ours goes through).
    Image.MAX_IMAGE_PIXELS = None
    with opening(path, "an image file", "no such file; check the path or re-run the preparation script"):
        file = open(path, "rb")
    # Pillow leaves a file it opened itself open when decoding fails; ours is closed here.
    with file:
        try:
            yield Image.open(file)
        except UnidentifiedImageError:
            raise DataError(f"{path}: not an image in a format Pillow reads; convert it, or move it out of the "
                            "folder") from None
        except OSError as error:
            raise DataError(f"{path}: cannot read image ({error}); the file is truncated or corrupt, "
                            "re-download or re-export it") from None


@contextlib.contextmanager
def _reading_exif(path: PathLike) -> Iterator[None]:
    """Turn an EXIF block Pillow cannot parse into a DataError: its orientation is unknown,
    so the pixels cannot be put the way viewers show them."""
    try:
        yield
    except SyntaxError as error:  # what Pillow raises for a malformed EXIF block
        raise DataError(f"{path}: cannot parse the image's EXIF metadata ({error}), which says how the image "
                        "is oriented; re-save the image with its EXIF removed or repaired") from None


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image, so that truncated files fail here, turned the way
    its EXIF (or TIFF) Orientation tag asks.

    Viewers and annotation tools show images turned so: an image and the mask drawn over it
    line up only when both are read that way. Without the tag (or with 1) the pixels are as
    stored.

    Args:
        path: any format Pillow reads.
    Returns:
        The decoded PIL image, of the file's mode (palette and 16-bit grey included).
    Raises:
        DataError: missing, unreadable, truncated or corrupt file, a folder, or EXIF
            metadata that cannot be parsed.
    """
    with _opened(path) as image:
        image.load()
        with _reading_exif(path):
            orientation = image.getexif().get(ExifTags.Base.Orientation)
    # Not ImageOps.exif_transpose: after turning it re-encodes the EXIF without the tag, which
    # fails on EXIF blocks that phones and cameras write and viewers read (Pillow issues 3973,
    # 4037, 4665, 6882). transpose keeps the mode and the palette.
    return image.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else image


def _png_chunks(file: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(type, length) of each chunk of a PNG, with the file at the chunk's data while the
    caller holds it; nothing for a file that is not a PNG."""
    if file.read(8) != PNG_SIGNATURE:
        return
    while len(header := file.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        data = file.tell()
        yield kind, length
        file.seek(data + length + 4)  # past the data and the CRC


def png_significant_bits(path: PathLike) -> Optional[int]:
    """The grey channel's significant bits a PNG declares (its sBIT chunk), or None.

    Pillow does not expose sBIT, so the chunks before the image data are read here.
    """
    with open(path, "rb") as file:
        for kind, length in _png_chunks(file):
            if kind == b"sBIT":
                return file.read(1)[0] if length else None
            if kind in (b"IDAT", b"IEND"):
                return None
    return None


def decoded_size(path: PathLike) -> tuple[int, int]:
    """(H, W) of the image read_image returns, decoded as it decodes it (so a truncated or
    unsupported file fails here too), without its tensor (an image's copies in float32
    and in three channels)."""
    image = _decoded(path)
    return image.height, image.width


def _decoded(path: PathLike) -> Image.Image:
    """open_image, refusing the pixel formats read_image cannot turn into a tensor."""
    image = open_image(path)
    if image.mode not in SIXTEEN_BIT_MODES + EIGHT_BIT_MODES:
        raise DataError(f"{path}: unsupported pixel format {image.mode!r}; save it as an 8-bit RGB/grey or 16-bit grey PNG")
    return image


def read_image(path: PathLike) -> Tensor:
    """Read an image as three channels.

    Grey images are replicated to three channels, alpha is dropped, palettes are expanded.

    Args:
        path: the image file.
    Returns:
        (3, H, W) uint8 for 8-bit sources, or float32 in [0, 1] for 16-bit grey, divided
        by 2**bits - 1 where bits is the depth the PNG declares in its sBIT chunk (12-bit
        X-rays are often stored so), else by 65535 -- see utils.images.to_unit_float.
    """
    image = _decoded(path)
    if image.mode in SIXTEEN_BIT_MODES:
        top = 2 ** (png_significant_bits(path) or 16) - 1
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / top).clamp_(0.0, 1.0)
        return grey.expand(3, -1, -1).contiguous()
    rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


def read_mask(path: PathLike, table: ClassTable, kind: MaskKind) -> Tensor:
    """Read a mask as class ids.

    Args:
        path: the mask file.
        table: the classes; ids must be below table.n_class.
        kind: "ids" for single-channel masks holding class ids (palette masks: the index is
            the id, see _check_palette_indices_are_ids), "colours" for RGB or palette masks
            drawn in the table's colours.
    Returns:
        (H, W) class ids, of utils.images.class_dtype (one byte up to 256 classes).
    Raises:
        DataError: naming the file, for a mask that does not match `kind` or the table
            (NotAColourMask for a grey mask read as colours).
    """
    image = open_image(path)
    if kind == "colours":
        if image.getbands()[0] in GREY_BANDS:
            raise NotAColourMask(
                f"{path}: mask has a single grey channel ({image.mode}), so it holds grey values or class ids, "
                f"not class colours; pass --mask_kind ids to read it as class ids"
            )
        try:
            return table.colours_to_ids(np.asarray(image.convert("RGB")))
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
    if kind != "ids":
        raise ValueError(f"mask kind must be 'ids' or 'colours', got {kind!r}")
    if image.mode not in ID_MODES:
        raise DataError(
            f"{path}: mask has {len(image.getbands())} channels ({image.mode}) but class ids were expected; "
            f"convert it to a single-channel id PNG (python -m dataset.prepare_deep_globe does this for DeepGlobe) "
            f"or pass --mask_kind colours to read it as a colour mask"
        )
    ids = np.asarray(image)
    if image.mode == "P":
        _check_palette_indices_are_ids(path, image, ids, table)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table.n_class):
        raise DataError(
            f"{path}: mask holds class ids {int(ids.min())}..{int(ids.max())} but the class table has "
            f"{table.n_class} classes (ids 0..{table.n_class - 1}); fix the mask or use a table with more classes"
        )
    # A copy: arrays of Pillow's buffer are read-only.
    return torch.from_numpy(ids.copy()).to(class_dtype(table.n_class))


def _check_palette_indices_are_ids(path: PathLike, image: Image.Image, indices: np.ndarray, table: ClassTable) -> None:
    """Refuse a palette mask, read as ids, whose used indices are all drawn in the table's
    colours but some in another class's colour: its colours, not its indices, are the
    classes, and reading the indices would silently swap classes. A mask whose palette
    has a colour outside the table (e.g. PASCAL VOC's) keeps its index as the id."""
    flat = image.getpalette() or []  # RGB triples, also for an RGBA palette
    palette = [tuple(flat[k : k + 3]) for k in range(0, len(flat), 3)]
    class_of = {colour: class_id for class_id, colour in enumerate(table.colours)}
    # An index beyond a short palette has no colour, so it is not drawn in a class's colour.
    drawn = {int(i): class_of.get(palette[i]) if i < len(palette) else None
             for i in np.flatnonzero(np.bincount(indices.ravel(), minlength=256))}
    if None in drawn.values():
        return
    for index, class_id in drawn.items():
        if class_id != index:
            raise DataError(
                f"{path}: palette mask index {index} is drawn in {palette[index]}, the colour of class {class_id} "
                f"{table.names[class_id]!r}, so its indices are not class ids; pass --mask_kind colours to read it "
                f"by its colours (or re-save the mask with index = class id)"
            )


def save_png(path: PathLike, array: np.ndarray) -> None:
    """Encode (H, W) uint8 grey or (H, W, 3) uint8 RGB as a PNG in a new file at `path`
    (a temporary name of utils.files, so the format is not taken from the suffix)."""
    with open(path, "xb") as file:
        Image.fromarray(array).save(file, format="PNG")


def write_png(path: PathLike, array: np.ndarray) -> None:
    """save_png, replacing `path` whole (utils.files.replacing) and creating its folders."""
    with replacing(path) as tmp:
        save_png(tmp, array)


def write_label(path: PathLike, label: Union[Tensor, np.ndarray]) -> None:
    """Write class ids as a single-channel 8-bit PNG (write_png).

    Args:
        path: the .png to write.
        label: (H, W) integer class ids in 0..255.
    """
    ids = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"class ids {ids.min()}..{ids.max()} do not fit an 8-bit PNG")
    write_png(path, ids.astype(np.uint8))
