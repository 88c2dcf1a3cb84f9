"""Class tables, image and mask reading, paired augmentation, layouts and the dataset."""
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset.io
from dataset.classes import DEEPGLOBE, LUNG, ClassTable, load_class_table
from dataset.io import open_image, png_significant_bits, read_image, read_mask, write_label
from dataset.layouts import deep_globe_samples, folder_samples
from dataset.segmentation import SegmentationDataset, build_dataset, collate
from dataset.transforms import augment
from utils.errors import DataError

RNG = np.random.default_rng(0)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def random_rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- class tables -----------------------------------------------------------------------

# GLNET_SPEC.md section 5: DeepGlobe's classes in id order, and their mask colours.
DEEPGLOBE_AS_PUBLISHED = (("unknown", (0, 0, 0)), ("urban", (0, 255, 255)), ("agriculture", (255, 255, 0)),
                          ("rangeland", (255, 0, 255)), ("forest", (0, 255, 0)), ("water", (0, 0, 255)),
                          ("barren", (255, 255, 255)))


def test_presets():
    assert DEEPGLOBE.n_class == 7 and DEEPGLOBE.ignore_in_metric == (0,)
    assert tuple(zip(DEEPGLOBE.names, DEEPGLOBE.colours)) == DEEPGLOBE_AS_PUBLISHED
    assert LUNG.n_class == 2 and LUNG.ignore_in_metric == ()


@pytest.mark.parametrize("n_class", [2, 256, 257])
def test_colorize_draws_each_id_in_its_colour(n_class):
    # 256 classes still fit a palette image; 257 do not (ids of more than a byte).
    colours = tuple((k % 256, k // 256, 255 - k % 256) for k in range(n_class))
    table = ClassTable(tuple(f"c{k}" for k in range(n_class)), colours)
    label = RNG.integers(0, n_class, (37, 53))
    rgb = table.colorize(label.T)  # not contiguous
    assert rgb.dtype == np.uint8 and rgb.shape == (53, 37, 3)
    assert all(tuple(rgb[y, x]) == colours[label[x, y]] for y in range(53) for x in range(37))
    assert table.colorize(np.zeros((0, 4), np.int64)).shape == (0, 4, 3)
    assert rgb.flags.writeable
    batch = table.colorize(np.stack([label, label]))  # any shape, as before
    assert batch.shape == (2, 37, 53, 3) and tuple(batch[1, 4, 5]) == colours[label[4, 5]]


def test_colorize_then_colours_to_ids_round_trips():
    label = torch.from_numpy(RNG.integers(0, 7, (5, 9)))
    rgb = DEEPGLOBE.colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 9, 3)
    assert tuple(rgb[0, 0]) == DEEPGLOBE.colours[int(label[0, 0])]
    ids = DEEPGLOBE.colours_to_ids(rgb)
    assert ids.dtype == torch.uint8 and torch.equal(ids, label)
    assert np.array_equal(DEEPGLOBE.colorize(label.numpy()), rgb)


def test_colours_to_ids_binarises_at_128():
    # Urban is (0, 255, 255): channels at 127 count as 0 and at 128 as 255.
    rgb = np.array([[[127, 128, 128], [120, 135, 200]]], np.uint8)
    assert DEEPGLOBE.colours_to_ids(rgb).tolist() == [[1, 1]]
    with pytest.raises(DataError, match=r"binarise to colour \(255, 0, 0\)"):
        DEEPGLOBE.colours_to_ids(np.array([[[128, 127, 0]]], np.uint8))


def write_table(path: Path, classes, ignore=(0,)) -> Path:
    path.write_text(json.dumps({"classes": classes, "ignore_in_metric": list(ignore)}))
    return path


def test_load_class_table_accepts_any_id_order(tmp_path):
    classes = [{"id": 1, "name": "lung", "colour": [255, 255, 255]}, {"id": 0, "name": "background", "colour": [0, 0, 0]}]
    table = load_class_table(write_table(tmp_path / "t.json", classes, ignore=()))
    assert table == LUNG


@pytest.mark.parametrize(
    "content, message",
    [
        ({"classes": [{"id": 0, "name": "a", "colour": [0, 0, 0]}, {"id": 2, "name": "b", "colour": [9, 9, 9]}]}, "0..n-1"),
        ({"classes": [{"id": 0, "name": "a", "colour": [0, 0, 0]}, {"id": 1, "name": "b", "colour": [0, 0, 0]}]}, "colours must differ"),
        ({"classes": [{"id": 0, "name": "a", "colour": [0, 0, 300]}]}, "0..255"),
        ({"classes": [{"id": 0, "name": "a", "colour": [0, 0, 0]}], "ignore_in_metric": [3]}, "ignore_in_metric"),
        ({"classes": [{"id": 0, "colour": [0, 0, 0]}]}, "expected"),
    ],
)
def test_load_class_table_rejects_bad_tables(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        load_class_table(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_class_table_names_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="no such class table"):
        load_class_table(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        load_class_table(tmp_path / "bad.json")
    with pytest.raises(DataError, match=f"{tmp_path}: is a folder, not a class table file"):
        load_class_table(tmp_path)
    png = save(tmp_path / "table.png", random_rgb(4, 4))  # e.g. a mask passed as --classes
    with pytest.raises(DataError, match=r"table\.png: not a text file"):
        load_class_table(png)


@pytest.mark.parametrize(
    "classes, ignore, message",
    [
        ([{"id": 0, "name": "a", "colour": [0, 0, 0]}, {"id": 1, "name": "b", "colour": [9, 9, 9]}], [1, 0], "all 2 classes"),
        ([{"id": 0, "name": "a", "colour": [0, 0, 0]}], [], r"at least 2 classes .*got 1"),
        ([], [], r"at least 2 classes .*got 0"),
    ],
)
def test_class_tables_without_a_metric_or_a_second_class_are_rejected(tmp_path, classes, ignore, message):
    path = write_table(tmp_path / "t.json", classes, ignore)
    with pytest.raises(DataError, match=message) as error:
        load_class_table(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    with pytest.raises(DataError, match=message):
        ClassTable(tuple(c["name"] for c in classes), tuple(tuple(c["colour"]) for c in classes), tuple(ignore))


# --- reading images and masks -----------------------------------------------------------

def test_read_image_rgb_non_square(tmp_path):
    rgb = random_rgb(6, 11)
    image = read_image(save(tmp_path / "a.png", rgb))
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 11)
    assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_read_image_8bit_modes_become_rgb_uint8(tmp_path, mode):
    rgb = random_rgb(5, 7)
    source = Image.fromarray(rgb)
    if mode == "L":
        source, expected = source.convert("L"), np.repeat(np.asarray(source.convert("L"))[..., None], 3, -1)
    elif mode == "RGBA":
        alpha = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
        source, expected = Image.fromarray(np.dstack([rgb, alpha])), rgb  # alpha dropped, not composited
    else:
        source = source.quantize(16)
        expected = np.array(source.convert("RGB"))
    source.save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_image_16bit_grey_scales_by_65535(tmp_path, suffix):
    grey = RNG.integers(0, 65536, (4, 9), dtype=np.uint16)
    image = read_image(save(tmp_path / f"a{suffix}", grey))
    assert image.dtype == torch.float32 and image.shape == (3, 4, 9)
    expected = torch.from_numpy(grey.astype(np.float32) / 65535)
    assert all(torch.equal(channel, expected) for channel in image)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_read_image_names_corrupt_files(tmp_path, damage):
    path = save(tmp_path / "a.png", random_rgb(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an image" * 10)
    # Pillow recognises a PNG cut short, not bytes of no known format.
    reason = "truncated or corrupt" if damage == "truncate" else "not an image in a format Pillow reads"
    with pytest.raises(DataError, match=reason) as error:
        read_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value) and "_io." not in str(error.value)


def test_read_image_names_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"absent\.png: no such file"):
        read_image(tmp_path / "absent.png")


def test_open_image_names_folders_and_unreadable_files(tmp_path, monkeypatch):
    (tmp_path / "tile.png").mkdir()
    with pytest.raises(DataError, match=r"tile\.png: is a folder, not an image file"):
        open_image(tmp_path / "tile.png")
    path = save(tmp_path / "a.png", random_rgb(4, 4))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads any file: fail the open as it fails for a user

        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(dataset.io, "open", denied, raising=False)
    with pytest.raises(DataError, match=r"a\.png: permission denied") as error:
        open_image(path)
    assert "corrupt" not in str(error.value)


def test_open_image_lifts_pillows_decompression_bomb_limit(tmp_path, monkeypatch):
    """Pillow refuses images over MAX_IMAGE_PIXELS (~179 MP); a small limit stands in for
    it, so that the test need not write a 13500 x 13500 image."""
    path = save(tmp_path / "big.png", random_rgb(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # what our reads would hit without lifting the limit
    assert read_image(path).shape == (3, 40, 30)


def test_read_mask_ids_and_palette(tmp_path):
    ids = RNG.integers(0, 7, (5, 8)).astype(np.uint8)
    assert torch.equal(read_mask(save(tmp_path / "l.png", ids), DEEPGLOBE, "ids"), torch.from_numpy(ids))
    palette = Image.fromarray(ids, mode="L").convert("P")
    palette.putpalette(list(np.asarray(DEEPGLOBE.colours, np.uint8).ravel()))
    palette.save(tmp_path / "p.png")
    label = read_mask(tmp_path / "p.png", DEEPGLOBE, "ids")
    assert label.dtype == torch.uint8 and torch.equal(label, torch.from_numpy(ids))


def test_sixteen_bit_id_masks_are_checked_before_taking_one_byte(tmp_path):
    """Labels are one byte per pixel up to 256 classes; a 16-bit id must not wrap into range."""
    ids = np.array([[0, 3], [6, 2]], dtype=np.uint16)
    Image.frombytes("I;16", (2, 2), ids.astype("<u2").tobytes()).save(tmp_path / "ok.png")
    label = read_mask(tmp_path / "ok.png", DEEPGLOBE, "ids")
    assert label.dtype == torch.uint8 and label.tolist() == [[0, 3], [6, 2]]
    ids[0, 0] = 256 + 3  # would read as 3 once cast to a byte
    Image.frombytes("I;16", (2, 2), ids.astype("<u2").tobytes()).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png: mask holds class ids 2\.\.259 but the class table has 7 classes"):
        read_mask(tmp_path / "bad.png", DEEPGLOBE, "ids")


def test_read_mask_rejects_colour_mask_where_ids_expected(tmp_path):
    path = save(tmp_path / "m.png", DEEPGLOBE.colorize(np.zeros((4, 4), np.int64)))
    with pytest.raises(DataError, match="3 channels") as error:
        read_mask(path, DEEPGLOBE, "ids")
    assert str(path) in str(error.value)


def test_read_mask_rejects_ids_beyond_the_table(tmp_path):
    path = save(tmp_path / "m.png", np.full((4, 4), 7, np.uint8))
    with pytest.raises(DataError, match=r"class ids 7\.\.7 but the class table has 7 classes") as error:
        read_mask(path, DEEPGLOBE, "ids")
    assert str(path) in str(error.value)


def test_read_mask_colours_with_noise_and_unknown_colour(tmp_path):
    label = RNG.integers(0, 7, (6, 6))
    noisy = DEEPGLOBE.colorize(label).astype(np.int64)
    noisy = np.where(noisy > 0, RNG.integers(128, 136, noisy.shape), RNG.integers(120, 128, noisy.shape)).astype(np.uint8)
    assert torch.equal(read_mask(save(tmp_path / "m.png", noisy), DEEPGLOBE, "colours"), torch.from_numpy(label))
    noisy[2, 3] = (250, 10, 10)
    path = save(tmp_path / "red.png", noisy)
    with pytest.raises(DataError, match=r"y=2, x=3.*\(255, 0, 0\)") as error:
        read_mask(path, DEEPGLOBE, "colours")
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I", "F", "I;16"])
def test_read_mask_rejects_grey_masks_read_as_colours(tmp_path, mode):
    """A grey mask converts to grey RGB, which binarises to black or white: a silent
    all-one-class label before this check."""
    grey = Image.fromarray(np.full((4, 4), 255, np.uint8)).convert(mode)
    path = tmp_path / ("m.tif" if mode in ("I", "F") else "m.png")  # PNG has no 32-bit grey
    grey.save(path)
    with pytest.raises(DataError, match=r"single grey channel .*class ids.*--mask_kind ids") as error:
        read_mask(path, DEEPGLOBE, "colours")
    assert str(error.value).startswith(str(path))


def test_read_mask_reads_palette_masks_as_colours(tmp_path):
    label = RNG.integers(0, 7, (5, 8)).astype(np.uint8)
    palette = Image.fromarray(label, mode="L").convert("P")
    palette.putpalette(list(np.asarray(DEEPGLOBE.colours, np.uint8).ravel()))
    palette.save(tmp_path / "p.png")
    assert torch.equal(read_mask(tmp_path / "p.png", DEEPGLOBE, "colours"), torch.from_numpy(label))


def test_write_label_round_trips(tmp_path):
    label = torch.from_numpy(RNG.integers(0, 7, (3, 5)))
    write_label(tmp_path / "sub" / "l.png", label)
    assert torch.equal(read_mask(tmp_path / "sub" / "l.png", DEEPGLOBE, "ids"), label)


# --- augmentation -----------------------------------------------------------------------

def all_transforms(image: torch.Tensor) -> list[torch.Tensor]:
    """The eight results of (flip or not) then (0..3 quarter turns), in that order."""
    return [torch.rot90(x, k, (-2, -1)) for x in (image, image.flip(-1)) for k in range(4)]


def test_augment_keeps_image_and_label_aligned_on_non_square():
    image = torch.randint(0, 256, (3, 6, 10), dtype=torch.uint8)
    label = image[0].long() % 7  # a label computed from the image must stay so after augmenting
    for seed in range(40):
        out_image, out_label = augment(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(out_label, out_image[0].long() % 7)
        assert out_image.is_contiguous() and out_label.is_contiguous()
        assert any(out_image.shape == t.shape and torch.equal(out_image, t) for t in all_transforms(image))


def test_augment_draws_glnet_probabilities():
    image = torch.arange(12.0).reshape(1, 3, 4)
    candidates = all_transforms(image)
    counts = np.zeros(8, int)
    for seed in range(600):
        out, _ = augment(image, None, torch.Generator().manual_seed(seed))
        counts[next(i for i, c in enumerate(candidates) if c.shape == out.shape and torch.equal(c, out))] += 1
    flipped, unrotated = counts[4:].sum() / 600, counts[[0, 4]].sum() / 600
    assert 0.42 < flipped < 0.58 and 0.42 < unrotated < 0.58
    assert counts.min() > 600 / 12 * 0.6  # each rotated outcome has probability 1/12


def test_augment_is_reproducible():
    image, label = torch.rand(3, 5, 7), torch.randint(0, 7, (5, 7))
    a = augment(image, label, torch.Generator().manual_seed(3))
    b = augment(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- layouts and the dataset ------------------------------------------------------------

def make_deep_globe_split(root: Path, split: str, ids, size=(12, 16), labelled=True) -> None:
    for i in ids:
        save(root / split / "Sat" / f"{i}_sat.jpg", random_rgb(*size))
        if labelled:
            write_label(root / split / "Label" / f"{i}_mask.png", RNG.integers(0, 7, size))


def test_deep_globe_preset(tmp_path):
    make_deep_globe_split(tmp_path, "train", ["20", "10"])
    make_deep_globe_split(tmp_path, "test", ["30"], labelled=False)
    train = build_dataset("deep_globe", tmp_path, "train")
    assert train.table == DEEPGLOBE and [s.id for s in train.samples] == ["10", "20"]
    item = train[0]
    assert item["id"] == "10" and item["image"].dtype == torch.uint8 and item["image"].shape == (3, 12, 16)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (12, 16)
    assert torch.equal(item["label"], read_mask(tmp_path / "train/Label/10_mask.png", DEEPGLOBE, "ids"))
    test = build_dataset("deep_globe", tmp_path, "test")
    assert test[0]["label"] is None and test.samples[0].mask is None


def test_folder_layout_mixed_suffixes_and_colour_masks(tmp_path):
    split = tmp_path / "val"
    save(split / "images" / "a.png", random_rgb(8, 5))
    save(split / "images" / "b.JPG", random_rgb(8, 5))
    save(split / "images" / "c.tiff", RNG.integers(0, 65536, (8, 5), dtype=np.uint16))
    (split / "images" / "notes.txt").write_text("ignored")
    labels = {i: RNG.integers(0, 2, (8, 5)) for i in "abc"}
    for i, label in labels.items():
        save(split / "masks" / f"{i}.png", LUNG.colorize(label))
    samples = folder_samples(tmp_path, "val")
    assert [s.id for s in samples] == ["a", "b", "c"] and samples[1].image.name == "b.JPG"
    dataset = build_dataset("folder", tmp_path, "val", table=LUNG, mask_kind="colours")
    assert dataset[2]["image"].dtype == torch.float32
    assert all(torch.equal(dataset[i]["label"], torch.from_numpy(labels[k])) for i, k in enumerate("abc"))


def test_folder_preset_needs_a_table(tmp_path):
    save(tmp_path / "train" / "images" / "a.png", random_rgb(4, 4))
    with pytest.raises(DataError, match="no default class table"):
        build_dataset("folder", tmp_path, "train")


@pytest.mark.parametrize(
    "breakage, message, named",
    [
        ("no_split", "no such split folder", "train"),
        ("empty", "no images named", "train/Sat"),
        ("mask_missing", r"no such mask \(1 of 2", "2_mask.png"),
    ],
)
def test_layout_errors_name_the_path(tmp_path, breakage, message, named):
    if breakage == "empty":
        (tmp_path / "train" / "Sat").mkdir(parents=True)
    elif breakage != "no_split":
        make_deep_globe_split(tmp_path, "train", ["1", "2"])
    if breakage == "mask_missing":
        (tmp_path / "train" / "Label" / "2_mask.png").unlink()
    with pytest.raises(DataError, match=message) as error:
        deep_globe_samples(tmp_path, "train")
    assert named in str(error.value) and "\n" not in str(error.value)


def test_size_mismatch_is_reported(tmp_path):
    make_deep_globe_split(tmp_path, "train", ["1"])
    write_label(tmp_path / "train" / "Label" / "1_mask.png", np.zeros((12, 15), np.uint8))
    with pytest.raises(DataError, match=r"1_mask.png: mask is \(12, 15\).*is \(12, 16\)"):
        build_dataset("deep_globe", tmp_path, "train")[0]


def test_augmentation_reproducible_per_seed_epoch_index(tmp_path):
    make_deep_globe_split(tmp_path, "train", [str(i) for i in range(4)], size=(6, 10))
    dataset = build_dataset("deep_globe", tmp_path, "train", augment=True, seed=5)

    def images(ds):
        return [ds[i]["image"] for i in range(len(ds))]

    first = images(dataset)
    assert all(torch.equal(a, b) for a, b in zip(first, images(dataset)))
    epochs = []
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        epochs.append(images(dataset))
    assert any(not torch.equal(a, b) or a.shape != b.shape for later in epochs for a, b in zip(first, later))
    dataset.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, images(dataset)))
    other_seed = build_dataset("deep_globe", tmp_path, "train", augment=True, seed=6)
    assert [g.initial_seed() for g in map(other_seed.generator, range(4))] != [g.initial_seed() for g in map(dataset.generator, range(4))]


def test_dataloader_workers_collate_and_match_indexing(tmp_path):
    make_deep_globe_split(tmp_path, "train", ["a", "b", "c"], size=(6, 10))
    dataset = build_dataset("deep_globe", tmp_path, "train", augment=True, seed=1)
    dataset.set_epoch(2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [b["id"] for b in batches] == [["a", "b"], ["c"]]
    assert all(isinstance(b["image"], list) and isinstance(b["label"], list) for b in batches)
    loaded = [image for b in batches for image in b["image"]]
    assert all(torch.equal(x, dataset[i]["image"]) for i, x in enumerate(loaded))


def test_the_trainers_loader_gives_the_same_batches_with_or_without_workers(tmp_path):
    """The number of loader workers changes nothing in the results (README, Training): the
    trainer's loader, started as training starts it, gives the same ids, images, labels and
    global images, in the epoch's order, epoch after epoch, with 0 or 2 workers."""
    from dataset.loader import make_loader
    from train_deep_globe import epoch_order
    from utils.distributed import DistInfo

    make_deep_globe_split(tmp_path, "train", ["a", "b", "c", "d", "e"], size=(40, 52))

    def epochs(workers):
        dataset = build_dataset("deep_globe", tmp_path, "train", augment=True, seed=3)
        batches = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            batches.append(list(make_loader(dataset, epoch_order(len(dataset), 3, epoch, DistInfo()), batch_size=2,
                                           num_workers=workers, size_g=(16, 16))))
        return batches

    alone, shared = epochs(0), epochs(2)
    assert [[b["id"] for b in epoch] for epoch in alone] == [[b["id"] for b in epoch] for epoch in shared]
    assert [b["id"] for b in alone[0]] != [b["id"] for b in alone[1]]  # two epochs, two orders
    for one, other in zip(sum(alone, []), sum(shared, [])):
        for key in ("image", "label", "global"):
            assert all(torch.equal(x, y) for x, y in zip(one[key], other[key])), key


def test_dataset_rejects_negative_seed():
    with pytest.raises(ValueError, match="non-negative"):
        SegmentationDataset([], DEEPGLOBE, seed=-1)


def _with_sbit(png: bytes, bits: int) -> bytes:
    """The PNG with an sBIT chunk (significant bits of the grey channel) after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4
    chunk = b"sBIT" + bytes([bits])
    return png[:ihdr_end] + struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[ihdr_end:]


def test_sixteen_bit_png_declaring_twelve_bits_is_scaled_by_4095(tmp_path):
    values = (np.arange(12).reshape(3, 4) * 372).astype(np.uint16)  # up to 4092: 12-bit data
    Image.fromarray(values).save(tmp_path / "plain.png")
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), 12))
    assert png_significant_bits(tmp_path / "plain.png") is None
    assert png_significant_bits(tmp_path / "sbit.png") == 12
    np.testing.assert_allclose(read_image(tmp_path / "plain.png")[0].numpy(), values / 65535, rtol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "sbit.png")[0].numpy(), values / 4095, rtol=1e-6)
