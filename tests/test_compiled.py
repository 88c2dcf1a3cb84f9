"""--compile (models/compiled.py): compiled evaluation against the reference and against eager
autocast, one graph per network for a folder of images, and the flag's rules.

ResNet-18 on small images: compiling costs about a minute per mode on two cores, whatever
the image size. The parity test's tolerances are the authors' (tests/parity.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import band_prediction
import config
import helper
from conftest import DEVICES, exact_cuda_math
from dataset.classes import DEEPGLOBE
from dataset.transforms import global_image
from models.glnet import GLNet
from models.stages import STAGES, Stage
from parity import EVAL_LOGITS_ATOL, check_predictions, engine_arrays, mode_keys, reference_arrays
from utils.patches import PatchGrid
from utils.weight_rule import apply_rule_weights

IMAGE, SIZE_G, SIZE_P, MICRO_BATCH = (100, 160), (64, 64), (80, 80), 2  # a 2 x 4 grid: four passes of two


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's graphs and counters live as long as the process: each test starts from none."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> tuple[int, int]:
    """Graphs compiled so far in this process, and graph breaks."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_evaluation_equals_the_reference(device):
    """Mode 3 compiles every network there is (both backbones, both heads, the frozen
    stage-1 backbone): the logits stay within the authors' evaluation tolerance of the
    reference, the argmax maps equal wherever the top-2 margin is not a near-tie, and the
    networks compile whole (no graph breaks)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*IMAGE, 3), dtype=np.uint8)
    label = rng.integers(0, 7, IMAGE, dtype=np.uint8)
    args = (1, image, label, SIZE_G, SIZE_P, MICRO_BATCH, 3)
    with exact_cuda_math(device):
        expected = reference_arrays(*args, device=device, backbone="resnet18")
        graphs, breaks = _graphs()
        out = engine_arrays(*args, device=device, backbone="resnet18", micro_batch_size=MICRO_BATCH, compiled=True)
    assert _graphs()[0] > graphs
    assert _graphs()[1] == breaks
    keys = mode_keys(expected, 3, "eval_", "_logits")
    assert len(keys) == 3
    for key in keys:
        np.testing.assert_allclose(out[key], expected[key], rtol=0, atol=EVAL_LOGITS_ATOL, err_msg=key)
    check_predictions(out, expected, 3, PatchGrid.build(IMAGE, SIZE_P))


def _session(compiled: bool, *flags: str) -> helper.Session:
    """A mode-2 session built as predict.py builds it (make_session), on rule weights, four
    patches per pass."""
    model = GLNet(DEEPGLOBE.n_class, "resnet18")
    apply_rule_weights(model, 0)  # trained-like BatchNorm statistics, which folding changes
    args = config.parse_args(["--evaluation", "--mode", "2", "--size_g", "64", "--size_p", "80",
                              "--micro_batch_size", "4", *flags, *(["--compile"] if compiled else [])])
    return helper.make_session(Stage.GLOBAL2LOCAL, model, None, DEEPGLOBE, args, torch.device("cpu"), inference=True)


def _logits(session: helper.Session, shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """Global, local and ensemble logits of a random image."""
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    samples = {"id": ["a"], "image": [image], "global": [global_image(image, SIZE_G)], "label": [None]}
    with torch.inference_mode():
        result = session.run(helper.to_batch(samples, session.device, with_labels=False)).images[0]
    return [result.global_logits] + [result.patch_logits(kind) for kind in STAGES[Stage.GLOBAL2LOCAL].predictions[1:]]


def test_compiled_autocast_is_as_close_to_fp32_as_eager_autocast_and_compiles_a_folder_once():
    """bf16 and channels-last, the GPU's fast settings, here under CPU autocast: compiled,
    the logits stay as close to fp32 as eager autocast's. (Eager autocast's own error sets
    the scale; the factor 2 leaves room for rounding in other places, as in
    test_helper.py's test of the weights stored for autocast.) Then a folder: another image
    whose passes hold as many patches adds no graph; each other pass size (3, 2, 1 patches)
    adds exactly two, the local backbone's and head's (models/compiled.py)."""
    fast = ("--amp", "bf16", "--channels_last")
    fp32 = _logits(_session(False), IMAGE)
    eager = _logits(_session(False, *fast), IMAGE)
    session = _session(True, *fast)
    compiled = _logits(session, IMAGE)
    first = _graphs()
    assert first[0] > 0 and first[1] == 0
    for got, eager_bf16, reference in zip(compiled, eager, fp32):
        assert 0 < (got - reference).abs().max() <= 2 * (eager_bf16 - reference).abs().max()
    assert all(torch.isfinite(t).all() for t in _logits(session, (150, 90), 1))  # 8 patches: passes of 4 and 4
    assert _graphs() == first
    last_passes = {(80, 240): 3, (100, 240): 2, (80, 200): 1}
    for shape, last in last_passes.items():
        assert len(PatchGrid.build(shape, SIZE_P)) % 4 == last
        assert all(torch.isfinite(t).all() for t in _logits(session, shape, 2))
    assert _graphs() == (first[0] + 2 * len(last_passes), 0)

    # Band by band (predict.py's path for very large images): grid rows of four patches
    # are passes of four, as the whole image's, so the same graphs give the same map.
    image = torch.randint(0, 256, (3, *IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = helper.predict_image(session, image)
    bands = [ids for _, ids in band_prediction.predict_bands(session, image, global_image(image, SIZE_G), band_rows=32)]
    assert torch.equal(torch.cat(bands), whole)
    assert _graphs() == (first[0] + 2 * len(last_passes), 0)


def test_compile_applies_to_evaluation_only():
    with pytest.raises(config.ConfigError, match="--compile applies to --evaluation"):
        config.check_args(config.parse_args(["--compile", "--size_g", "64", "--size_p", "80"]), DEEPGLOBE)
    with pytest.raises(ValueError, match="networks that only predict"):
        helper.make_session(Stage.GLOBAL, GLNet(7, "resnet18"), None, DEEPGLOBE, config.parse_args(["--compile"]),
                            torch.device("cpu"), inference=False)


def test_compile_on_a_cpu_without_a_cpp_compiler_is_one_clear_line(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler-lungseg",))
    args = config.parse_args(["--evaluation", "--compile", "--device", "cpu", "--size_g", "64", "--size_p", "80"])
    with pytest.raises(config.ConfigError, match=r"--compile on CPU needs a C\+\+ compiler .* or drop --compile"):
        config.check_args(args, DEEPGLOBE)


def test_compile_on_cuda_names_what_triton_lacks(monkeypatch):
    """Triton builds its launchers with $CC, else gcc, else clang; without one the first
    compiled call would fail deep inside it."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    assert config.missing_compile_toolchain(cuda).startswith("Triton")
    monkeypatch.undo()
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(config.shutil, "which", lambda name: None)
    assert "a C compiler for Triton" in config.missing_compile_toolchain(cuda)
    monkeypatch.setenv("CC", "/opt/cc")
    assert config.missing_compile_toolchain(cuda) is None


def test_predict_compiles_the_networks_it_runs_and_says_the_first_image_will_wait(models, tmp_path, monkeypatch,
                                                                                    capsys):
    """The command line's wiring, without the minutes of compiling (the tests above hold
    what compiling does): predict.py hands its networks, the frozen stage-1 branch and
    the largest pass to compile_for_inference once, and tells the user why the first
    image takes long."""
    import predict
    from PIL import Image

    calls = []
    monkeypatch.setattr(helper, "compile_for_inference", lambda *args: calls.append(args))
    Image.fromarray(np.zeros((100, 150, 3), np.uint8)).save(tmp_path / "a.png")
    assert predict.main(["--model_path", str(models), "--device", "cpu", "--mode", "3", "--size_g", "64",
                         "--size_p", "96", "--micro_batch_size", "3", "--backbone", "resnet18", "--compile",
                         "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 0
    ((model, frozen, largest_pass),) = calls
    assert isinstance(model, GLNet) and frozen is not None and largest_pass == 3
    assert helper.COMPILE_NOTE in capsys.readouterr().err
    assert (tmp_path / "out" / "a_ids.png").exists()
