import contextlib
import shutil
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


@contextlib.contextmanager
def exact_cuda_math(device: str):
    """Disable TF32 on CUDA: the authors' numbers are float32 math."""
    if not str(device).startswith("cuda"):
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def parity_run(parity_inputs):
    """parity_run(impl, device, mode): the parity arrays of the fixtures' protocol (seed 0,
    size_g = size_p = 256, sub-batch 4) from "reference" (models/reference.py) or "engine"
    (models/stages.py, whole sub-batches per pass), computed once per session."""
    from parity import engine_arrays, reference_arrays

    image, label = parity_inputs
    cache: dict[tuple[str, str, int], dict] = {}

    def get(impl: str, device: str, mode: int) -> dict:
        if (impl, device, mode) not in cache:
            args = (0, image, label, (256, 256), (256, 256), 4, mode)
            with exact_cuda_math(device):
                if impl == "reference":
                    cache[impl, device, mode] = reference_arrays(*args, device=device)
                else:
                    cache[impl, device, mode] = engine_arrays(*args, device=device)
        return cache[impl, device, mode]

    return get


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A folder with every stage's checkpoint under its default name (one random ResNet-18
    network for all), for predict.py."""
    import config
    from dataset.classes import DEEPGLOBE
    from models.glnet import GLNet
    from models.stages import Stage
    from utils.checkpoint import save_weights

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = GLNet(DEEPGLOBE.n_class, "resnet18")
    for stage in Stage:
        save_weights(model, folder / config.default_checkpoint(stage))
    return folder


# A training run small enough for a test: ResNet-18, tiny sizes, the CPU, no ImageNet file.
TINY = ["--backbone", "resnet18", "--size_g", "64", "--size_p", "96", "--batch_size", "2",
        "--sub_batch_size", "4", "--num_workers", "0", "--device", "cpu", "--pretrained", "none"]


def tiny_args(data: Path, tmp: Path, *extra) -> list[str]:
    """train_deep_globe's flags for a TINY run on `data`, writing under `tmp`."""
    return ["--data_path", str(data), "--model_path", str(tmp / "models"), "--log_path", str(tmp / "logs"),
            *TINY, *map(str, extra)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A DeepGlobe-layout demo set (2 train, 1 crossvali, 1 test image of 128 x 128)."""
    from dataset.make_demo import make_deep_globe_demo

    root = tmp_path_factory.mktemp("pristine")
    make_deep_globe_demo(root, n_train=2, n_val=1, n_test=1, size=128, seed=1)
    return root


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A copy of `pristine` that the test may damage."""
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root


def write_svs(path: Path, pixels, tile: int) -> Path:
    """An Aperio-style slide of (H, W, 3) uint8 pixels (the description OpenSlide
    recognises), deflated so that the pixels read back exactly, with a level 4 times
    smaller."""
    import tifffile

    h, w = pixels.shape[:2]
    aperio = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) {{}}|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(path) as tif:
        for level, what in [(pixels, "JPEG/RGB Q=70"), (pixels[::4, ::4], "-> downsampled")]:
            tif.write(level, tile=(tile, tile), compression="zlib", photometric="rgb", metadata=None,
                      description=aperio.format(what))
    return path
