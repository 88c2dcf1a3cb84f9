"""Reading images and masks into tensors, and writing class-id masks.

Every failure caused by the files themselves is a DataError naming the file.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dataset.classes import ClassTable
from dataset.errors import DataError, opening
from utils.patches import class_dtype

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


class NotAColourMask(DataError):
    """A single-channel mask read as a colour mask (callers may reword the advice)."""


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image, so that truncated files fail here.

    Args:
        path: any format Pillow reads.
    Returns:
        The decoded PIL image.
    Raises:
        DataError: missing, unreadable, truncated or corrupt file, or a folder.
    """
    # Pillow refuses images over ~179 megapixels as possible decompression bombs, but
    # ultra-high-resolution images are what this code is for, and they are the user's own
    # files: lift the limit (set here, where every read of ours goes through).
    Image.MAX_IMAGE_PIXELS = None
    with opening(path, "an image file", "no such file; check the path or re-run the preparation script"):
        file = open(path, "rb")
    # Pillow leaves a file it opened itself open when decoding fails; ours is closed here.
    with file:
        try:
            image = Image.open(file)
            image.load()
        except OSError as error:
            raise DataError(f"{path}: cannot read image ({error}); the file is truncated or corrupt, "
                            "re-download or re-export it") from None
    return image


def png_significant_bits(path: PathLike) -> Optional[int]:
    """The grey channel's significant bits a PNG declares (its sBIT chunk), or None.

    Pillow does not expose sBIT, so the chunks before the image data are read here.
    """
    with open(path, "rb") as file:
        if file.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            header = file.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                return file.read(length)[0]
            if kind in (b"IDAT", b"IEND"):
                return None
            file.seek(length + 4, 1)  # the chunk's data and CRC


def read_image(path: PathLike) -> Tensor:
    """Read an image as three channels.

    Grey images are replicated to three channels, alpha is dropped, palettes are expanded.

    Args:
        path: the image file.
    Returns:
        (3, H, W) uint8 for 8-bit sources, or float32 in [0, 1] for 16-bit grey, divided
        by 2**bits - 1 where bits is the depth the PNG declares in its sBIT chunk (12-bit
        X-rays are often stored so), else by 65535 -- see dataset.transforms.to_unit_float.
    """
    image = open_image(path)
    if image.mode in SIXTEEN_BIT_MODES:
        top = 2 ** (png_significant_bits(path) or 16) - 1
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32) / top).clamp_(0.0, 1.0)
        return grey.expand(3, -1, -1).contiguous()
    if image.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{path}: unsupported pixel format {image.mode!r}; save it as an 8-bit RGB/grey or 16-bit grey PNG")
    rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


def read_mask(path: PathLike, table: ClassTable, kind: MaskKind) -> Tensor:
    """Read a mask as class ids.

    Args:
        path: the mask file.
        table: the classes; ids must be below table.n_class.
        kind: "ids" for single-channel masks holding class ids (palette masks: the index is
            the id), "colours" for RGB or palette masks drawn in the table's colours.
    Returns:
        (H, W) class ids, of utils.patches.class_dtype (one byte up to 256 classes).
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
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table.n_class):
        raise DataError(
            f"{path}: mask holds class ids {int(ids.min())}..{int(ids.max())} but the class table has "
            f"{table.n_class} classes (ids 0..{table.n_class - 1}); fix the mask or use a table with more classes"
        )
    # A copy: arrays of Pillow's buffer are read-only.
    return torch.from_numpy(ids.copy()).to(class_dtype(table.n_class))


def write_label(path: PathLike, label: Union[Tensor, np.ndarray]) -> None:
    """Write class ids as a single-channel 8-bit PNG, creating parent folders.

    Args:
        path: the .png to write.
        label: (H, W) integer class ids in 0..255.
    """
    ids = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"class ids {ids.min()}..{ids.max()} do not fit an 8-bit PNG")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)
