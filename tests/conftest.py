from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _two_threads():
    # CI machines have 2 cores; pinning keeps timings and float noise predictable.
    torch.set_num_threads(2)
    yield


# Devices for cheap tests: CPU always, CUDA where present (the GPU run happens on a lent machine).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.fixture(scope="session")
def parity_ref():
    """The arrays of the reference parity capture (tests/fixtures/parity_seed0.npz)."""
    import numpy as np

    with np.load(FIXTURES / "parity_seed0.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def parity_meta():
    """Side information of the parity capture (tests/fixtures/parity_seed0.json)."""
    import json

    return json.loads((FIXTURES / "parity_seed0.json").read_text())


@pytest.fixture(scope="session")
def parity_inputs():
    """(image (600, 600, 3) uint8, label (600, 600) uint8) of the parity capture, from the PNGs."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(FIXTURES / "parity_image.png").convert("RGB")).copy()
    label = np.asarray(Image.open(FIXTURES / "parity_label.png")).copy()
    return image, label
