"""Class tables: names, mask colours and the classes the metric leaves out.

The DeepGlobe and lung tables are defined here and nowhere else.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utils.errors import DataError, opening
from utils.images import class_dtype

Colour = tuple[int, int, int]
BINARY_THRESHOLD = 128  # DeepGlobe's official rule: a mask channel is "on" when >= 128
TABLE_KEYS = ("classes", "ignore_in_metric")
CLASS_KEYS = ("id", "name", "colour")
TABLE_EXAMPLE = '{"classes": [{"id": 0, "name": ..., "colour": [r, g, b]}, ...], "ignore_in_metric": [...]}'


@dataclass(frozen=True)
class ClassTable:
    """Class id i is called names[i] and drawn as colours[i] (RGB) in colour masks.

    ignore_in_metric: class ids that are trained on but left out of the mean IoU.
    """

    names: tuple[str, ...]
    colours: tuple[Colour, ...]
    ignore_in_metric: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colours):
            raise DataError(f"need one colour per class, got {len(self.names)} names and {len(self.colours)} colours")
        for colour in self.colours:
            if len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
                raise DataError(f"colour {list(colour)} is not three integers in 0..255")
        if len(set(self.colours)) != len(self.colours):
            raise DataError(f"colours must differ between classes, got {[list(c) for c in self.colours]}")
        bad = [i for i in self.ignore_in_metric if not 0 <= i < self.n_class]
        if bad:
            raise DataError(f"ignore_in_metric holds ids {bad} outside 0..{self.n_class - 1}")
        if self.n_class < 2:
            # One class is nothing to segment; the model would fail later with no file named.
            raise DataError(f"a class table needs at least 2 classes (e.g. background and foreground), got {self.n_class}")
        if set(self.ignore_in_metric) >= set(range(self.n_class)):
            raise DataError(
                f"ignore_in_metric leaves out all {self.n_class} classes, so the mean IoU would be undefined (NaN); "
                f"keep at least one class in the metric"
            )

    @property
    def n_class(self) -> int:
        return len(self.names)

    def colorize(self, label: Union[Tensor, np.ndarray]) -> np.ndarray:
        """Draw a label map in the table's colours.

        Args:
            label: (H, W) class ids in 0..n_class-1.
        Returns:
            (H, W, 3) uint8 RGB.
        """
        ids = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_class):
            raise ValueError(f"label holds ids {ids.min()}..{ids.max()}, the table has 0..{self.n_class - 1}")
        if not ids.size or ids.ndim != 2 or self.n_class > 256:
            return np.asarray(self.colours, dtype=np.uint8)[ids]
        # Pillow maps a palette image to RGB in C, faster than numpy's indexing and without
        # the GIL, so predict.py's writer threads colour side by side.
        image = Image.frombuffer("P", ids.shape[::-1], np.ascontiguousarray(ids, dtype=np.uint8), "raw", "P", 0, 1)
        image.putpalette([c for colour in self.colours for c in colour])
        return np.array(image.convert("RGB"))  # writable, as numpy's indexing returns

    def colours_to_ids(self, rgb: Union[Tensor, np.ndarray]) -> Tensor:
        """Class ids of a colour mask, binarising each channel at 128 first so that
        compression noise maps to the nearest pure colour (the DeepGlobe rule).

        Args:
            rgb: (H, W, 3) uint8.
        Returns:
            (H, W) class ids, of utils.images.class_dtype.
        Raises:
            DataError: a binarised colour that is not in the table (the message does not
                name a file; callers that read one prefix it).
        """
        rgb = rgb.numpy() if isinstance(rgb, Tensor) else np.asarray(rgb)
        codes = _binary_codes(rgb)
        lookup = np.full(8, -1, dtype=np.int64)
        for class_id, colour in enumerate(self.colours):
            code = int(_binary_codes(np.asarray(colour))[()])
            if lookup[code] >= 0:
                raise DataError(
                    f"classes {lookup[code]} and {class_id} have the same colour after binarising at "
                    f"{BINARY_THRESHOLD}; colour masks need class colours made of 0 and 255"
                )
            lookup[code] = class_id
        ids = lookup[codes]
        unknown = ids < 0
        if unknown.any():
            y, x = (int(v[0]) for v in np.nonzero(unknown))
            colour = tuple(255 * int(c >= BINARY_THRESHOLD) for c in rgb[y, x])
            raise DataError(
                f"{int(unknown.sum())} pixels (first at y={y}, x={x}, value {tuple(int(c) for c in rgb[y, x])}) "
                f"binarise to colour {colour}, which is not in the class table; fix the mask or add the colour to the table"
            )
        return torch.from_numpy(ids).to(class_dtype(self.n_class))


def _binary_codes(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colours -> (...) integers 0..7, one bit per binarised channel (R high)."""
    bits = (rgb >= BINARY_THRESHOLD).astype(np.int64)
    return 4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]


DEEPGLOBE = ClassTable(
    names=("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"),
    colours=((0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255)),
    ignore_in_metric=(0,),
)
LUNG = ClassTable(names=("background", "lung"), colours=((0, 0, 0), (255, 255, 255)))
# Tables a command line can name instead of giving a JSON file.
NAMED_TABLES = {"deep_globe": DEEPGLOBE, "lung": LUNG}


def load_class_table(path: Union[str, Path]) -> ClassTable:
    """Read a class table from JSON:
    `{"classes": [{"id": 0, "name": "background", "colour": [0, 0, 0]}, ...], "ignore_in_metric": [0]}`.

    Args:
        path: the JSON file. Ids must be 0..n-1 (in any order), colours distinct; no other keys.
    Returns:
        The ClassTable.
    Raises:
        DataError: naming the file, for a missing or malformed file.
    """
    path = Path(path)
    with opening(path, "a class table file", "no such class table file; check the path"):
        data = path.read_bytes()
    try:
        spec = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; pass a JSON class table (see README, 'Your own data')") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); fix the file") from None
    return table_from_json(spec, path)


def table_from_json(spec: object, source: Union[str, Path]) -> ClassTable:
    """The ClassTable of a parsed class table JSON (see load_class_table) read from `source`."""
    _check_layout(source, spec)
    try:
        classes = sorted(spec["classes"], key=lambda c: c["id"])  # type: ignore[index]
        ids = [c["id"] for c in classes]
        if ids != list(range(len(ids))):
            raise DataError(f"class ids must be 0..n-1 with no gaps or repeats, got {ids}")
        return ClassTable(
            names=tuple(str(c["name"]) for c in classes),
            colours=tuple(tuple(c["colour"]) for c in classes),
            ignore_in_metric=tuple(spec.get("ignore_in_metric", ())),  # type: ignore[union-attr]
        )
    except (KeyError, TypeError) as error:
        raise DataError(f"{source}: expected {TABLE_EXAMPLE} (problem: {error!r}); fix the file") from None
    except DataError as error:
        raise DataError(f"{source}: {error}; fix the file") from None


def table_to_json(table: ClassTable) -> dict:
    """The class table JSON of `table` (load_class_table's format)."""
    return {"classes": [{"id": i, "name": name, "colour": list(colour)}
                        for i, (name, colour) in enumerate(zip(table.names, table.colours))],
            "ignore_in_metric": list(table.ignore_in_metric)}


def _check_layout(path: Union[str, Path], spec: object) -> None:
    """Refuse a table that is not an object with a list of class objects, or that has a key
    this code does not read: a misspelt key would otherwise be ignored without a word."""
    if not isinstance(spec, dict):
        raise DataError(f"{path}: the top level must be a JSON object; expected {TABLE_EXAMPLE}")
    _check_keys(path, spec, TABLE_KEYS, "class table key")
    classes = spec.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        raise DataError(f'{path}: "classes" must be a list of objects, one per class; expected {TABLE_EXAMPLE}')
    for n, entry in enumerate(classes):
        _check_keys(path, entry, CLASS_KEYS, "class key", f" in classes[{n}]")


def _check_keys(path: Union[str, Path], spec: dict, allowed: tuple[str, ...], what: str, where: str = "") -> None:
    """Refuse the first key of `spec` not in `allowed`, suggesting the closest allowed one."""
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            advice = f'did you mean "{close[0]}"?' if close else "remove it"
            listing = ", ".join(f'"{k}"' for k in allowed)
            # json.dumps keeps the message one line whatever the key holds.
            raise DataError(
                f"{path}: {json.dumps(key, ensure_ascii=False)}{where} is not a {what}; {advice} (allowed: {listing})"
            )
