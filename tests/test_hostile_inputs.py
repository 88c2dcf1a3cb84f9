"""Faults and hostile inputs: EXIF orientation, palette masks read as ids, class tables
with unknown keys. Expectations come from the EXIF specification and the class tables,
computed with numpy, not with the code under test."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.classes import DEEPGLOBE, LUNG, load_class_table
from dataset.io import decoded_size, open_image, read_image, read_mask
from utils.errors import DataError

RNG = np.random.default_rng(0)
ORIENTATION = 0x0112

# What a viewer shows for each EXIF orientation, from the specification's "where the
# stored 0th row and 0th column are shown": 6 is (right, top), a quarter turn clockwise.
SHOWN = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
    8: lambda a: np.rot90(a, 1),
}


def save_oriented(path: Path, image: Image.Image, orientation: int, **kwargs) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    image.save(path, exif=exif, **kwargs)
    return path


def palette_mask(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    mask = Image.fromarray(indices.astype(np.uint8), mode="L").convert("P")
    mask.putpalette(list(np.asarray(palette, np.uint8).ravel()))
    return mask


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks
    )


def one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


# --- EXIF orientation -------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_the_exif_orientation(tmp_path, orientation):
    rgb = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = save_oriented(tmp_path / "a.png", Image.fromarray(rgb), orientation)
    expected = SHOWN[orientation](rgb)
    assert torch.equal(read_image(path), torch.from_numpy(expected.transpose(2, 0, 1).copy()))


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_tag_is_applied_once(tmp_path, compression, orientation):
    """Pillow turns TIFFs itself as it loads them; they must not be turned twice."""
    rgb = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = tmp_path / "a.tif"
    Image.fromarray(rgb).save(path, tiffinfo={ORIENTATION: orientation}, compression=compression)
    expected = SHOWN[orientation](rgb)
    assert torch.equal(read_image(path), torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    """Camera JPEGs: lossy, so flat blocks compared with a tolerance."""
    blocks = np.kron(RNG.integers(0, 256, (2, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    path = save_oriented(tmp_path / "a.jpg", Image.fromarray(blocks), 6, quality=95, subsampling=0)
    image = read_image(path).permute(1, 2, 0).numpy().astype(int)
    assert image.shape == (64, 32, 3)
    assert np.abs(image - np.rot90(blocks, -1)).max() <= 8


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_read_mask_applies_the_exif_orientation(tmp_path, orientation):
    ids = RNG.integers(0, 7, (5, 8)).astype(np.uint8)
    expected = torch.from_numpy(SHOWN[orientation](ids).copy())
    grey = save_oriented(tmp_path / "l.png", Image.fromarray(ids), orientation)
    assert torch.equal(read_mask(grey, DEEPGLOBE, "ids"), expected)
    palette = save_oriented(tmp_path / "p.png", palette_mask(ids, DEEPGLOBE.colours), orientation)
    assert torch.equal(read_mask(palette, DEEPGLOBE, "ids"), expected)
    assert torch.equal(read_mask(palette, DEEPGLOBE, "colours"), expected)
    colour = save_oriented(tmp_path / "c.png", Image.fromarray(DEEPGLOBE.colorize(ids)), orientation)
    assert torch.equal(read_mask(colour, DEEPGLOBE, "colours"), expected)


def test_turning_keeps_palettes_and_sixteen_bit_grey(tmp_path):
    ids = RNG.integers(0, 7, (5, 8)).astype(np.uint8)
    path = save_oriented(tmp_path / "p.png", palette_mask(ids, DEEPGLOBE.colours), 6)
    image = open_image(path)
    assert image.mode == "P" and image.size == (5, 8)
    assert image.getpalette()[: 3 * DEEPGLOBE.n_class] == list(np.ravel(DEEPGLOBE.colours))

    grey = RNG.integers(0, 65536, (5, 8)).astype(np.uint16)
    path = save_oriented(tmp_path / "g.png", Image.frombytes("I;16", (8, 5), grey.astype("<u2").tobytes()), 6)
    assert open_image(path).mode == "I;16"
    expected = torch.from_numpy(np.rot90(grey, -1) / np.float32(65535)).float()
    assert torch.equal(read_image(path), expected.expand(3, -1, -1))
    ids16 = (grey % 7).astype(np.uint16)
    path = save_oriented(tmp_path / "m.png", Image.frombytes("I;16", (8, 5), ids16.astype("<u2").tobytes()), 8)
    assert torch.equal(read_mask(path, DEEPGLOBE, "ids"), torch.from_numpy(np.rot90(ids16, 1).astype(np.uint8)))


def test_decoded_size_is_read_images_and_fails_where_it_fails(tmp_path):
    rgb = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    paths = [save_oriented(tmp_path / f"{o}.png", Image.fromarray(rgb), o) for o in range(1, 9)]
    grey = Image.frombytes("I;16", (8, 5), RNG.integers(0, 65536, (5, 8)).astype("<u2").tobytes())
    paths.append(save_oriented(tmp_path / "g.png", grey, 6))
    Image.fromarray(rgb).save(tmp_path / "plain.jpg")
    for path in [*paths, tmp_path / "plain.jpg"]:
        assert decoded_size(path) == tuple(read_image(path).shape[1:]), path.name
    cut = tmp_path / "cut.png"
    Image.fromarray(RNG.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:-2000])
    Image.new("I", (8, 5)).save(tmp_path / "int32.tif")
    for bad, message in ((cut, "truncated or corrupt"), (tmp_path / "int32.tif", "unsupported pixel format")):
        for read in (read_image, decoded_size):
            with pytest.raises(DataError, match=message):
                read(bad)


def test_png_exif_after_the_pixel_data_counts(tmp_path):
    """PNG allows metadata after the pixels; Pillow finds it only after decoding them."""
    rgb = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    path = save_oriented(tmp_path / "a.png", Image.fromarray(rgb), 6)
    chunks = png_chunks(path.read_bytes())
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] != b"eXIf"]
    path.write_bytes(png_bytes(rest[:-1] + exif + rest[-1:]))  # just before IEND
    assert [kind for kind, _ in png_chunks(path.read_bytes())][-2:] == [b"eXIf", b"IEND"]
    assert torch.equal(read_image(path), torch.from_numpy(np.rot90(rgb, -1).transpose(2, 0, 1).copy()))


def test_exif_that_pillow_cannot_re_encode_is_still_applied(tmp_path):
    """An ImageDescription stored as a RATIONAL rather than text: the orientation reads, but
    Pillow cannot write the block back, which ImageOps.exif_transpose does after turning."""
    entries = struct.pack(">HHII", 0x010E, 5, 1, 38) + struct.pack(">HHIHH", ORIENTATION, 3, 1, 6, 0)
    ifd = struct.pack(">H", 2) + entries + struct.pack(">I", 0)  # 30 bytes from offset 8: the rational at 38
    exif = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd + struct.pack(">II", 72, 1)
    rgb = RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png", exif=exif)
    assert torch.equal(read_image(tmp_path / "a.png"), torch.from_numpy(np.rot90(rgb, -1).transpose(2, 0, 1).copy()))


def test_unparsable_exif_is_a_data_error(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(RNG.integers(0, 256, (5, 8, 3), dtype=np.uint8)).save(path, exif=b"not exif at all")
    with pytest.raises(DataError, match="cannot parse the image's EXIF metadata") as error:
        read_image(path)
    assert "re-save the image" in one_line_naming(error, path)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(DataError, match="is a folder, not an image file"):
        read_image(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="not an image in a format Pillow reads") as error:
        read_image(tmp_path / "notes.png")
    one_line_naming(error, tmp_path / "notes.png")


def test_empty_sbit_chunk_is_ignored(tmp_path):
    """A zero-length sBIT chunk declares no depth: 16-bit grey is divided by 65535."""
    grey = np.array([[0, 65535], [4095, 1000]], np.uint16)
    path = tmp_path / "g.png"
    Image.frombytes("I;16", (2, 2), grey.astype("<u2").tobytes()).save(path)
    chunks = png_chunks(path.read_bytes())
    path.write_bytes(png_bytes(chunks[:1] + [(b"sBIT", b"")] + chunks[1:]))
    assert torch.equal(read_image(path)[0], torch.from_numpy(grey / np.float32(65535)).float())


# --- palette masks read as ids ----------------------------------------------------------

def ids_from_colours(rgb: np.ndarray, colours) -> np.ndarray:
    match = (rgb[..., None, :] == np.asarray(colours, np.uint8)).all(-1)
    assert match.any(-1).all()
    return match.argmax(-1)


def test_palette_mask_in_the_table_colours_at_their_ids_reads_as_ids(tmp_path):
    ids = RNG.integers(0, 7, (6, 9)).astype(np.uint8)
    palette_mask(ids, DEEPGLOBE.colours).save(tmp_path / "p.png")
    assert torch.equal(read_mask(tmp_path / "p.png", DEEPGLOBE, "ids"), torch.from_numpy(ids))


def test_palette_mask_with_permuted_class_colours_is_refused_as_ids(tmp_path):
    label = RNG.integers(0, 7, (6, 9))
    label[0, :7] = np.arange(7)  # every class present
    order = np.array([0, 2, 1, 3, 4, 6, 5])  # index order[c] is drawn in class c's colour
    palette = np.zeros((7, 3), np.uint8)
    palette[order] = DEEPGLOBE.colours
    path = tmp_path / "p.png"
    palette_mask(order[label], palette).save(path)
    with pytest.raises(DataError, match="--mask_kind colours") as error:
        read_mask(path, DEEPGLOBE, "ids")
    message = one_line_naming(error, path)
    assert "index 1 is drawn in (255, 255, 0), the colour of class 2 'agriculture'" in message
    expected = ids_from_colours(palette[order[label]], DEEPGLOBE.colours)
    assert np.array_equal(expected, label)
    assert torch.equal(read_mask(path, DEEPGLOBE, "colours"), torch.from_numpy(expected.astype(np.uint8)))


def test_voc_style_palette_masks_read_by_index(tmp_path):
    """A palette of the mask's own (PASCAL VOC's first entries): the index is the id."""
    voc = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128)]
    ids = RNG.integers(0, 7, (6, 9)).astype(np.uint8)
    palette_mask(ids, voc).save(tmp_path / "voc.png")
    assert torch.equal(read_mask(tmp_path / "voc.png", DEEPGLOBE, "ids"), torch.from_numpy(ids))
    # A grey palette (what converting "L" to "P" gives): 0/1 lung ids read by index.
    lung = RNG.integers(0, 2, (6, 9)).astype(np.uint8)
    Image.fromarray(lung).convert("P").save(tmp_path / "grey.png")
    assert torch.equal(read_mask(tmp_path / "grey.png", LUNG, "ids"), torch.from_numpy(lung))


def test_grey_palette_mask_drawn_0_255_is_refused_as_lung_ids(tmp_path):
    """Indices 0 and 255 in black and white: the lung table's colours, index 255 in class 1's."""
    lung = RNG.integers(0, 2, (6, 9)).astype(np.uint8)
    path = tmp_path / "m.png"
    Image.fromarray(lung * 255).convert("P").save(path)
    with pytest.raises(DataError, match=r"index 255 is drawn in \(255, 255, 255\), the colour of class 1 'lung'") as error:
        read_mask(path, LUNG, "ids")
    one_line_naming(error, path)
    assert torch.equal(read_mask(path, LUNG, "colours"), torch.from_numpy(lung))


def indexed(ids: np.ndarray, palette: list[int], mode: str = "RGB") -> Image.Image:
    mask = Image.new("P", ids.shape[::-1])
    mask.putdata(ids.ravel().tolist())
    mask.putpalette(palette, mode)
    return mask


def test_short_palettes(tmp_path):
    ids = np.array([[0, 1, 2, 1]], np.uint8)
    swapped = [DEEPGLOBE.colours[i] for i in (0, 2, 1)]  # a 3-entry palette
    indexed(ids, [c for rgb in swapped for c in rgb]).save(tmp_path / "short.png")
    with pytest.raises(DataError, match=r"index 1 is drawn in \(255, 255, 0\), the colour of class 2"):
        read_mask(tmp_path / "short.png", DEEPGLOBE, "ids")
    # Index 6 has no palette entry, so no class colour: the indices are ids.
    ids = np.array([[0, 1, 6, 4]], np.uint8)
    indexed(ids, [c for rgb in DEEPGLOBE.colours[:5] for c in rgb]).save(tmp_path / "beyond.png")
    assert len(Image.open(tmp_path / "beyond.png").getpalette()) == 15
    assert torch.equal(read_mask(tmp_path / "beyond.png", DEEPGLOBE, "ids"), torch.from_numpy(ids))


def test_rgba_palettes_compare_rgb(monkeypatch):
    """PNG reloads an RGBA palette as RGB plus tRNS, so the RGBA palette is given in memory."""
    ids = np.array([[0, 1, 2, 1]], np.uint8)
    swapped = indexed(ids, [c for i in (0, 2, 1) for c in (*DEEPGLOBE.colours[i], 128)], "RGBA")
    in_order = indexed(ids, [c for rgb in DEEPGLOBE.colours[:3] for c in (*rgb, 255)], "RGBA")
    assert swapped.palette.mode == in_order.palette.mode == "RGBA"
    monkeypatch.setattr("dataset.io.open_image", lambda path: swapped)
    with pytest.raises(DataError, match=r"m\.png: palette mask index 1 is drawn in \(255, 255, 0\)"):
        read_mask("m.png", DEEPGLOBE, "ids")
    monkeypatch.setattr("dataset.io.open_image", lambda path: in_order)
    assert torch.equal(read_mask("m.png", DEEPGLOBE, "ids"), torch.from_numpy(ids))


# --- class tables with unknown keys -----------------------------------------------------

def write_json(path: Path, spec) -> Path:
    path.write_text(json.dumps(spec))
    return path


LUNG_CLASSES = [{"id": 0, "name": "background", "colour": [0, 0, 0]}, {"id": 1, "name": "lung", "colour": [255, 255, 255]}]


def test_valid_table_still_loads(tmp_path):
    assert load_class_table(write_json(tmp_path / "t.json", {"classes": LUNG_CLASSES, "ignore_in_metric": []})) == LUNG
    assert load_class_table(write_json(tmp_path / "u.json", {"classes": LUNG_CLASSES})) == LUNG


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"classes": LUNG_CLASSES, "ignore_in_metrics": [0]},
         '"ignore_in_metrics" is not a class table key; did you mean "ignore_in_metric"? '
         '(allowed: "classes", "ignore_in_metric")'),
        ({"classes": [LUNG_CLASSES[0], {"id": 1, "name": "lung", "color": [255, 255, 255]}]},
         '"color" in classes[1] is not a class key; did you mean "colour"? (allowed: "id", "name", "colour")'),
        ({"classes": LUNG_CLASSES, "weights\n": [1, 2]}, '"weights\\n" is not a class table key; remove it'),
        ([LUNG_CLASSES], "the top level must be a JSON object"),
        ({"ignore_in_metric": []}, '"classes" must be a list of objects'),
        ({"classes": [LUNG_CLASSES[0], [1, "lung", [255, 255, 255]]]}, '"classes" must be a list of objects'),
    ],
)
def test_malformed_tables_are_named_with_a_fix(tmp_path, spec, message):
    path = write_json(tmp_path / "t.json", spec)
    with pytest.raises(DataError) as error:
        load_class_table(path)
    assert message in one_line_naming(error, path)
