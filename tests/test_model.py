"""GLNet's structure (models/): the authors' state-dict layout, parameter counts, branch
shapes, statelessness, the FPN's context rules and the fixtures' weight rule.

Structural tests use the ResNet-18 variant (fast); the ResNet-50 network is built only
where the reference tables describe it.
"""
from __future__ import annotations

import ast
import copy
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from conftest import DEVICES, FIXTURES, ROOT
from test_patches import _Kernels
from models.backbone import ResNetBackbone, fold_batchnorm
from models.fpn import FPN, Context, _concat_resized
from models.glnet import (BRANCH_GROUPS, GLNet, GlobalBranch, crop_context, empty_canvases, normalised_context,
                          paste_context)
from models.stages import Batch, Stage, run_stage, set_branch_modes
from utils.layout import memory_format_of
from utils.weight_rule import apply_rule_weights, rule_tensor
from utils.patches import PatchGrid, coverage_on_map, crop_to_patches, extract_patches, paste_patches
from utils.resample import resize

N_CLASS = 5


def _tsv(name: str) -> list[dict[str, str]]:
    with open(FIXTURES / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def glnet50() -> GLNet:
    return GLNet(7)


def _small(seed: int = 0, n_class: int = N_CLASS) -> GLNet:
    torch.manual_seed(seed)
    return GLNet(n_class, backbone="resnet18")


# --------------------------------------------------------------------------- layout


def test_state_dict_matches_the_authors_key_table(glnet50):
    rows = _tsv("state_dict_keys.tsv")
    state = glnet50.state_dict()
    assert len(rows) == len(state) == 718
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    for row, (key, value) in zip(rows, state.items()):
        assert row["key"].startswith("module.")
        assert row["key"][len("module.") :] == key  # same order, key for key
        assert list(value.shape) == ast.literal_eval(row["shape"]), key
        assert value.dtype == dtypes[row["dtype"]], key
        assert value.numel() == int(row["numel"]), key


# docs/authors_behaviour.md, section 7.3: (parameter tensors, parameters, buffer tensors, buffer elements, keys).
PARAMETER_TABLE = {
    "resnet_global": (159, 23_508_032, 159, 53_173, 318),
    "resnet_local": (159, 23_508_032, 159, 53_173, 318),
    "fpn_global": (52, 18_322_439, 0, 0, 52),
    "fpn_local": (28, 13_797_895, 0, 0, 28),
    "ensemble_conv": (2, 64_519, 0, 0, 2),
}


def test_parameter_counts_per_submodule(glnet50):
    assert tuple(name for name, _ in glnet50.named_children()) == BRANCH_GROUPS == tuple(PARAMETER_TABLE)
    for name, (n_params, params, n_buffers, buffer_elems, keys) in PARAMETER_TABLE.items():
        module = getattr(glnet50, name)
        counted = (
            len(list(module.parameters())),
            sum(p.numel() for p in module.parameters()),
            len(list(module.buffers())),
            sum(b.numel() for b in module.buffers()),
            len(module.state_dict()),
        )
        assert counted == (n_params, params, n_buffers, buffer_elems, keys), name
    assert sum(p.numel() for p in glnet50.parameters()) == 79_200_917
    # 106 BatchNorm layers, all in the two backbones.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in glnet50.modules()) == 106


def test_global_branch_keys_are_the_plain_global_half(glnet50):
    def plain_global(key: str) -> bool:
        top, layer = key.split(".")[:2]
        return top == "resnet_global" or (top == "fpn_global" and not layer.endswith("_ext") and layer != "smooth")

    keys = list(GlobalBranch(7).state_dict())
    assert keys == [k for k in glnet50.state_dict() if plain_global(k)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_equals_torchvisions_resnet(arch):
    """Our ResNet has torchvision's keys in its order and, with its weights, its features."""
    reference = getattr(torchvision.models, arch)().eval()
    ours = ResNetBackbone(arch).eval()
    weights = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert list(ours.state_dict()) == list(weights)
    ours.load_state_dict(weights)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = ours(x)
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for layer, mine in zip((reference.layer1, reference.layer2, reference.layer3, reference.layer4), c):
            r = layer(r)
            torch.testing.assert_close(mine, r, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_folded_batchnorm_computes_the_same_features(arch, channels_last):
    backbone = ResNetBackbone(arch).eval()
    apply_rule_weights(backbone, 0)  # running statistics away from 0 and 1
    layout = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=layout)
    folded = copy.deepcopy(backbone)
    fold_batchnorm(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(m.bias is not None and m.weight.is_contiguous(memory_format=layout) for m in convs)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0)).to(memory_format=layout)
    with torch.no_grad():
        for mine, reference in zip(folded(x), backbone(x)):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    with pytest.raises(ValueError, match="already folded"):
        fold_batchnorm(folded)


def test_importing_the_models_does_not_import_torchvision():
    code = "import sys, helper, predict; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_channels_follow_the_backbone():
    model = _small()
    assert model.resnet_global.channels == (64, 128, 256, 512)
    assert model.fpn_global.toplayer.in_channels == 512
    assert model.fpn_global.toplayer_ext.in_channels == 1024
    assert model.fpn_local.toplayer.in_channels == 1024
    assert model.fpn_local.latlayer3.in_channels == 128
    assert model.ensemble_conv.in_channels == 1024 and model.ensemble_conv.out_channels == N_CLASS


def test_initialisation():
    model = _small()
    for head in (model.fpn_global, model.fpn_local):
        for name, conv in head.named_children():
            assert torch.equal(conv.bias, torch.zeros_like(conv.bias)), name
            if conv.weight.numel() >= 10_000:
                assert 0.009 < conv.weight.std().item() < 0.011, name
                assert abs(conv.weight.mean().item()) < 1e-3, name
    assert 0.009 < model.ensemble_conv.weight.std().item() < 0.011
    with pytest.raises(ValueError):
        GLNet(1, backbone="resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        GLNet(3, backbone="resnet7")


# --------------------------------------------------------------------------- branch shapes


def _check_branch(out, batch: int, size: tuple[int, int], n_class: int, ps3_channels: int = 512):
    h, w = size
    assert out.logits.shape == (batch, n_class, h // 4, w // 4)
    assert out.ps3.shape == (batch, ps3_channels, h // 4, w // 4)
    for level, (c, stride, channels) in enumerate(zip(out.c, (4, 8, 16, 32), (64, 128, 256, 512))):
        assert c.shape == (batch, channels, -(-h // stride), -(-w // stride)), level
    # FPN levels are ordered p5..p2, with the sizes of c5..c2.
    for maps, channels in ((out.fpn.ps0, 256), (out.fpn.ps1, 256), (out.fpn.ps2, 128)):
        assert [tuple(m.shape) for m in maps] == [(batch, channels, *c.shape[-2:]) for c in out.c[::-1]]


@pytest.mark.parametrize("device", DEVICES)
def test_branch_shapes(device):
    model = _small().to(device).eval()
    images = torch.rand(2, 3, 64, 96, device=device)
    with torch.no_grad():
        glob = model.global_branch(images)
        _check_branch(glob, 2, (64, 96), N_CLASS)

        grid = PatchGrid.build((100, 130), (64, 64))
        idx = range(3, 8)
        patches = extract_patches(torch.rand(3, 100, 130, device=device), grid, idx)
        local = model.local_branch(patches, glob.image(1).context(), grid, idx)
        _check_branch(local, 5, (64, 64), N_CLASS)

        term = model.ensemble_local_term(local.ps3)
        assert term.shape == (5, N_CLASS, 16, 16)
        ensemble, crop = model.ensemble(term, glob.ps3[1:2], grid, idx)
        assert ensemble.shape == (5, N_CLASS, 16, 16) and crop.shape == (5, 512, 16, 16)
        # Splitting ensemble_conv into a local and a global term is exact up to float noise.
        direct = model.ensemble_conv(torch.cat((local.ps3, crop), dim=1))
        torch.testing.assert_close(ensemble, direct, rtol=1e-5, atol=1e-6)

        # The global head with merged local features as context (stage 3) keeps its shapes.
        ext = model.global_branch(images, glob.context())
        _check_branch(ext, 2, (64, 96), N_CLASS)
        assert not torch.equal(ext.logits, glob.logits)


def test_non_square_images():
    model = _small().eval()
    with torch.no_grad():
        _check_branch(model.global_branch(torch.rand(1, 3, 96, 160)), 1, (96, 160), N_CLASS)
        # Patches are cropped from a non-square image whose global image is square.
        image = torch.rand(3, 60, 120)
        res = run_stage(Stage.GLOBAL2LOCAL, model, Batch([image], torch.rand(1, 3, 64, 64)),
                        patch_size=(64, 64), sub_batch_size=3)
    grid = res.images[0].grid
    # The 60 px side is shorter than the patch: one row of patches 60 px high.
    assert grid.image_size == (60, 120) and grid.patch_size == (60, 64) and grid.n_rows == 1
    assert res.images[0].local_logits.shape == (grid.n_cols, N_CLASS, 15, 16)
    assert res.images[0].ensemble_logits.shape == (grid.n_cols, N_CLASS, 15, 16)


# --------------------------------------------------------------------------- statelessness


def _tensor_attributes(module: nn.Module) -> list[str]:
    """Names of attributes (also inside lists, tuples and dicts) holding tensors that are
    not the module's registered parameters or buffers."""
    found = []

    def walk(value, path):
        if isinstance(value, Tensor):
            found.append(path)
        elif isinstance(value, nn.Module):
            return  # submodules are walked on their own
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple, set)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    for name, value in vars(module).items():
        if name not in ("_parameters", "_buffers", "_modules"):
            walk(value, name)
    return found


def test_modules_hold_no_activations_after_forwards():
    model = _small()
    frozen = GlobalBranch(N_CLASS, backbone="resnet18")
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    image, label = torch.rand(3, 66, 70), torch.randint(0, N_CLASS, (66, 70))
    batch = Batch([image], torch.rand(1, 3, 64, 64), [label])
    for stage in Stage:
        model.train()
        run_stage(stage, model, batch, patch_size=(64, 64), sub_batch_size=4, frozen_global=frozen, backward=True)
        model.eval()
        with torch.inference_mode():
            run_stage(stage, model, batch, patch_size=(64, 64), sub_batch_size=4, frozen_global=frozen)
    for root in (model, frozen):
        for name, module in root.named_modules():
            assert _tensor_attributes(module) == [], f"{type(module).__name__} {name!r} holds tensors"
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_give_identical_outputs(device):
    model = _small().to(device).eval()
    frozen = GlobalBranch(N_CLASS, backbone="resnet18").to(device).eval()
    batch = Batch([torch.rand(3, 66, 70, device=device)], torch.rand(1, 3, 64, 64, device=device))
    for stage in Stage:
        with torch.inference_mode():
            a, b = (run_stage(stage, model, batch, patch_size=(64, 64), sub_batch_size=4, frozen_global=frozen)
                    for _ in range(2))
        assert torch.equal(a.images[0].global_logits, b.images[0].global_logits), stage
        if stage is not Stage.GLOBAL:
            assert torch.equal(a.images[0].local_logits, b.images[0].local_logits), stage
            assert torch.equal(a.images[0].ensemble_logits, b.images[0].ensemble_logits), stage


@pytest.mark.parametrize("backward", [False, True], ids=["eval", "train"])
def test_channels_last_convolutions_get_channels_last_inputs(backward):
    """A convolution given another layout than its channels-last weights converts its
    input first: a hidden copy of every joined map, global and local. Crops, canvases
    and joins keep the maps' layout, so only the stems (3-channel images) see another."""
    model = _small().to(memory_format=torch.channels_last)
    frozen = GlobalBranch(N_CLASS, backbone="resnet18").to(memory_format=torch.channels_last).eval()
    seen: dict[str, int] = {}

    def check(name):
        def hook(module, args):
            x = args[0]
            if x.shape[1] > 3:  # the stems' 3-channel inputs convert at no real cost
                seen[name] = seen.get(name, 0) + 1
                assert memory_format_of(x) == torch.channels_last, name
        return hook

    for root, net in (("model", model), ("frozen", frozen)):
        for name, module in net.named_modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_pre_hook(check(f"{root}.{name}"))
    image = torch.rand(3, 100, 130)
    batch = Batch([image], torch.rand(1, 3, 64, 64), [torch.randint(0, N_CLASS, (100, 130))])
    for stage in Stage:
        set_branch_modes(model, stage, training=backward)
        with torch.set_grad_enabled(backward):
            run_stage(stage, model, batch, patch_size=(64, 64), sub_batch_size=4, frozen_global=frozen,
                      backward=backward)
    # Every head saw context: the check ran on the joined maps of both FPNs.
    assert {"model.fpn_local.smooth", "model.fpn_global.smooth", "model.fpn_global.smooth4_1_ext"} <= set(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_merged_context_is_each_local_map_pasted_and_normalised_on_its_own(channels_last, dtype):
    """Stage 3's canvases hold the maps of one size in one buffer, so a pass adds into four
    buffers, not sixteen maps. The merged maps must be, to the bit, what pasting and
    normalising every map on its own gives (the authors' per-map procedure), and come out
    as dense maps in the network's layout, as the global head's convolutions expect."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = _small().to(dtype=dtype, memory_format=layout).eval()
    grid = PatchGrid.build((300, 260), (96, 96))
    joined, alone = _Kernels(), _Kernels()
    with torch.no_grad():
        like = model.global_branch(torch.rand(1, 3, 64, 64, dtype=dtype).contiguous(memory_format=layout)).context()
        canvases = empty_canvases(like)
        own = [[torch.zeros_like(m) for m in maps] for maps in like]
        for idx in grid.batches(4):
            patches = extract_patches(torch.rand(3, 300, 260, dtype=dtype), grid, idx).contiguous(memory_format=layout)
            local = model.local_branch(patches, like, grid, idx).context()
            paste_context(empty_canvases(like), local, grid, idx)  # makes the index tensors, counted in neither
            with joined:
                paste_context(canvases, local, grid, idx)
            with alone:
                for maps, patch_maps in zip(own, local):
                    for canvas, m in zip(maps, patch_maps):
                        paste_patches(canvas, m, grid, idx)
        merged = normalised_context(canvases, grid)
    assert len(canvases.buffers) == 4
    for field, (maps, ours) in enumerate(zip(own, merged)):
        for level, (expected, got) in enumerate(zip(maps, ours)):
            expected = expected / coverage_on_map(grid, expected.shape[-2:]).to(dtype)
            assert torch.equal(got, expected), (field, level)
            assert got.dtype == dtype and got.is_contiguous(memory_format=layout), (field, level)
    # Each map is still resized on its own; the joined pieces cost a cat per box size, and
    # everything else (gathers, copies into tables of cells, the adds) a quarter as many calls.
    resizes = [k.names.count("upsample_bilinear2d") for k in (joined, alone)]
    rest = [[n for n in k.names if n not in ("upsample_bilinear2d", "cat")] for k in (joined, alone)]
    assert resizes[0] == resizes[1] and "cat" not in alone.names
    assert len(rest[1]) == 4 * len(rest[0]) and rest[0].count("index_add_") > 0


def test_canvases_share_buffers_only_between_maps_of_one_size_dtype_and_layout():
    """A map of another dtype or layout than the others of its size gets a buffer of its
    own, so every merged map keeps its own dtype and layout."""
    maps = [torch.randn(1, c, 8, 8) for c in (3, 5, 2)]
    like = Context((maps[0], maps[1].double(), maps[2].contiguous(memory_format=torch.channels_last)),
                   (torch.randn(1, 4, 8, 8),), (torch.randn(1, 6, 4, 4),), ())
    canvases = empty_canvases(like)
    assert [b.shape[1] for b in canvases.buffers] == [3 + 4, 5, 2, 6]
    grid = PatchGrid.build((100, 100), (60, 60))
    local = Context(*(tuple(torch.rand(len(grid), m.shape[1], 5, 5, dtype=torch.float32) for m in field)
                      for field in like))
    paste_context(canvases, local, grid, range(len(grid)))
    merged = normalised_context(canvases, grid)
    for field, (maps_like, maps_local, ours) in enumerate(zip(like, local, merged)):
        for m, patch_maps, got in zip(maps_like, maps_local, ours):
            expected = paste_patches(torch.zeros_like(m), patch_maps, grid, range(len(grid)))
            expected = expected / coverage_on_map(grid, m.shape[-2:]).to(m.dtype)
            assert got.dtype == m.dtype and memory_format_of(got) == memory_format_of(m), field
            assert torch.equal(got, expected), field


# --------------------------------------------------------------------------- FPN context rules


def test_fpn_context_rules():
    model = _small().eval()
    frozen = GlobalBranch(N_CLASS, backbone="resnet18").eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        context = model.global_branch(images).context()
        c = model.resnet_global(images)
        with pytest.raises(ValueError, match="takes no context"):
            frozen.fpn_global(c, context)  # plain set only
        with pytest.raises(ValueError, match="needs context"):
            model.fpn_local(c)  # context set only
        # GLNet's global head has both sets.
        model.fpn_global(c)
        model.fpn_global(c, context)
    with pytest.raises(ValueError):
        FPN(N_CLASS, (64, 128, 256, 512), plain=False, context_suffix=None)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_concat_resized_is_the_cat_of_the_resized_maps(layout):
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, ch, side, side, generator=g).to(memory_format=layout) for ch, side in
            ((3, 4), (5, 8), (2, 16), (4, 16))]
    out = _concat_resized(iter(maps), 14, (16, 16))
    assert torch.equal(out, torch.cat([resize(m, (16, 16)) for m in maps], dim=1))
    assert out.is_contiguous(memory_format=layout)
    with pytest.raises(ValueError, match="15 channels in all, got 14"):
        _concat_resized(iter(maps), 15, (16, 16))


def test_the_local_heads_context_is_cropped_level_by_level_when_read():
    model = _small().eval()
    grid = PatchGrid.build((100, 90), (64, 64))
    with torch.no_grad():
        glob = model.global_branch(torch.rand(1, 3, 64, 64))
        local_c = model.resnet_local(torch.rand(2, 3, 64, 64))
    full = glob.context()
    context = crop_context(full, grid, [1, 3], local_c)
    for field, (lazy, maps) in enumerate(zip(context, full)):
        assert len(lazy) == len(maps) == 4
        for level, crop in enumerate(lazy):
            size = local_c[level].shape[-2:] if field == 0 else local_c[3 - level].shape[-2:]
            assert torch.equal(crop, crop_to_patches(maps[level], grid, [1, 3], size)), (field, level)
    with pytest.raises(TypeError, match="one level at a time"):
        context.c[1:]


# --------------------------------------------------------------------------- weight rule


def test_rule_weights_match_the_reference_check(glnet50):
    rows = _tsv("rule_weights_seed0_check.tsv")
    state = glnet50.state_dict()
    assert [r["key"] for r in rows] == list(state)
    for row in rows:
        key = row["key"]
        value = rule_tensor(key, state[key], seed=0)
        assert list(value.shape) == ast.literal_eval(row["shape"]) and value.dtype == state[key].dtype, key
        flat = value.reshape(-1).numpy()
        np.testing.assert_allclose(flat.astype(np.float64).sum(), float(row["sum"]), rtol=1e-9, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(
            (flat.astype(np.float64) ** 2).sum(), float(row["sum_sq"]), rtol=1e-9, atol=1e-12, err_msg=key
        )
        assert flat[:4].astype(np.float64).tolist() == ast.literal_eval(row["first4"]), key


def test_apply_rule_weights_is_prefix_free_and_shared_with_the_frozen_copy():
    model, frozen = _small(1), GlobalBranch(N_CLASS, backbone="resnet18")
    apply_rule_weights(model, 3)
    apply_rule_weights(frozen, 3)
    full = model.state_dict()
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, full[key]), key
    assert all(v.item() == 0 for k, v in full.items() if k.endswith("num_batches_tracked"))
    apply_rule_weights(frozen, 4)
    assert not torch.equal(frozen.state_dict()["fpn_global.classify.weight"], full["fpn_global.classify.weight"])
