"""Optimizer groups, the poly schedule, test-time augmentation and the metrics."""
from __future__ import annotations

import math

import pytest
import torch

import helper
import utils.progress
from dataset.classes import DEEPGLOBE
from dataset.transforms import global_image
from models.glnet import GLNet, GlobalBranch
from models.stages import STAGES, Stage
from utils import metrics
from utils.weight_rule import apply_rule_weights
from utils.metrics import ConfusionMatrix
from utils.optim import Adam041


# The authors' optimizer (docs/authors_behaviour.md, section 3): Adam, weight decay 5e-4, one group per
# module in state-dict order; the branch a stage does not train gets lr 0, the ensemble
# convolution learns in every stage.
AUTHORS_LEARNING_GROUPS = {
    Stage.GLOBAL: {"resnet_global", "fpn_global", "ensemble_conv"},
    Stage.GLOBAL2LOCAL: {"resnet_local", "fpn_local", "ensemble_conv"},
    Stage.LOCAL2GLOBAL: {"resnet_global", "fpn_global", "ensemble_conv"},
}


# The predictions each stage's evaluation makes (docs/authors_behaviour.md, section 4).
AUTHORS_PREDICTIONS = {Stage.GLOBAL: {"global"}, Stage.GLOBAL2LOCAL: {"global", "local", "ensemble"},
                       Stage.LOCAL2GLOBAL: {"global", "local", "ensemble"}}


@pytest.mark.parametrize("stage", list(Stage))
def test_optimizer_has_the_authors_five_groups_with_lr_zero_for_frozen_ones(stage):
    model = GLNet(7, "resnet18")
    opt = helper.build_optimizer(model, stage, 1e-3)
    assert isinstance(opt, torch.optim.Adam)
    assert [g["name"] for g in opt.param_groups] == ["resnet_global", "resnet_local", "fpn_global", "fpn_local",
                                                      "ensemble_conv"]
    for group in opt.param_groups:
        assert group["lr"] == (1e-3 if group["name"] in AUTHORS_LEARNING_GROUPS[stage] else 0.0)
        assert (group["weight_decay"], group["betas"], group["eps"]) == (5e-4, (0.9, 0.999), 1e-8)
        assert group["params"] == list(getattr(model, group["name"]).parameters())


def _adam_041(params, grads_per_step, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """torch 0.4.1's Adam step (docs/authors_behaviour.md, section 3), written out in float64."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    params = [p.clone() for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m_, v_ in zip(params, grads, m, v):
            g = g + weight_decay * p
            m_.mul_(betas[0]).add_((1 - betas[0]) * g)
            v_.mul_(betas[1]).add_((1 - betas[1]) * g * g)
            step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            p -= step * m_ / (v_.sqrt() + eps)
    return params


def test_training_steps_adam_as_the_authors_torch_did():
    """Gradients of every size, the tiny ones where eps decides the step: after 40 steps,
    interrupted and resumed from the state dict half way, the weights are torch 0.4.1's;
    torch 2's own Adam, which adds eps after the bias correction, is not."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(50, generator=gen, dtype=torch.float64) * 0.01, torch.randn(7, generator=gen, dtype=torch.float64)]
    scales = torch.logspace(-12, 0, 50, dtype=torch.float64)
    grads = [[torch.randn(50, generator=gen, dtype=torch.float64) * scales, torch.randn(7, generator=gen, dtype=torch.float64)]
             for _ in range(40)]
    expected = _adam_041(start, grads, lr=1e-3, weight_decay=5e-4)

    def run(optimizer_class, resume_at=None):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

        def make():
            return optimizer_class([{"params": params[:1]}, {"params": params[1:]}, {"params": [frozen], "lr": 0.0}],
                                   lr=1e-3, weight_decay=5e-4)
        opt = make()
        for t, step_grads in enumerate(grads):
            if t == resume_at:
                state = opt.state_dict()
                opt = make()
                opt.load_state_dict(state)
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            frozen.grad = torch.ones_like(frozen)
            opt.step()
        assert torch.equal(frozen.detach(), torch.ones(3, dtype=torch.float64))
        return [p.detach() for p in params]

    for got in (run(Adam041), run(Adam041, resume_at=17)):
        for p, e in zip(got, expected):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-15)
    modern = run(torch.optim.Adam)
    assert not torch.allclose(modern[0], expected[0], rtol=1e-6, atol=0)


def test_adam_runs_a_closure_before_it_reads_the_gradients():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = Adam041([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    torch.testing.assert_close(p.detach(), _adam_041([torch.ones(2, dtype=torch.float64)],
                                                     [[torch.full((2,), 2.0, dtype=torch.float64)]], 0.1, 0.0)[0])


def test_adam_refuses_a_group_whose_parameters_stepped_apart():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = Adam041([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    b.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="different numbers of steps"):
        opt.step()


def test_poly_schedule_starts_at_the_base_lr_and_decays_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [param], "lr": 0.1}, {"params": [], "lr": 0.0}])
    sched = helper.poly_schedule(opt, total_iters=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.1
    assert lrs == pytest.approx([0.1 * (1 - t / 10) ** 0.9 for t in range(10)])
    assert opt.param_groups[1]["lr"] == 0.0


@pytest.mark.parametrize("k, flip", helper.TTA_TRANSFORMS)
def test_tta_transforms_invert(k, flip):
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    assert torch.equal(helper._untransform(helper._transform(x, k, flip), k, flip), x)


def _session(stage: Stage) -> helper.Session:
    torch.manual_seed(0)
    model = GLNet(7, "resnet18").eval()
    frozen = GlobalBranch(7, "resnet18").eval() if stage is Stage.LOCAL2GLOBAL else None
    return helper.Session(stage, model, frozen, DEEPGLOBE, (64, 64), (96, 96), 4, 0.15, torch.device("cpu"))


def test_the_evaluation_bar_shows_a_score_only_once_there_are_labels(capsys, monkeypatch):
    monkeypatch.setattr(utils.progress, "EVERY", 0.0)  # stderr is no terminal here: a line per batch
    session = _session(Stage.GLOBAL)
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    samples = {"id": ["a"], "image": [image], "global": [global_image(image, (64, 64))], "label": [None]}
    helper.evaluate(session, [samples])
    err = capsys.readouterr().err
    assert "eval: 1/1 batch" in err and "miou=" not in err
    labelled = dict(samples, label=[torch.zeros(100, 120, dtype=torch.long)])
    helper.evaluate(session, [samples, labelled])
    assert "miou=" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [Stage.GLOBAL2LOCAL, Stage.LOCAL2GLOBAL])
def test_evaluation_results_do_not_depend_on_the_micro_batch(stage):
    image = torch.randint(0, 256, (3, 200, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    samples = {"id": ["a"], "image": [image], "global": [global_image(image, (64, 64))], "label": [None]}
    results = []
    for n in (1, 3, 6):
        session = _session(stage)
        session.micro_batch_size = n
        assert session.micro_batch == n
        with torch.inference_mode():
            results.append(session.run(helper.to_batch(samples, session.device, with_labels=False)).images[0])
    for other in results[1:]:
        for kind in ("local", "ensemble"):
            torch.testing.assert_close(other.patch_logits(kind), results[0].patch_logits(kind), rtol=1e-5, atol=1e-6)
            assert torch.equal(other.patch_logits(kind).argmax(1), results[0].patch_logits(kind).argmax(1))


@pytest.mark.parametrize("stage", list(Stage))
def test_networks_stored_for_autocast_predict_as_closely_as_autocast_alone(stage):
    """Folded BatchNorm and convolution weights stored in bf16 keep the predictions as close
    to fp32 as autocast with the fp32 networks does (CPU autocast here, CUDA's alike)."""
    image = torch.randint(0, 256, (3, 120, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    samples = {"id": ["a"], "image": [image], "global": [global_image(image, (64, 64))], "label": [None]}

    def predict(amp, stored):
        session = _session(stage)
        for net in (session.model, session.frozen_global):
            if net is not None:  # trained-like BatchNorm statistics, which folding changes
                apply_rule_weights(net, 0)
        session.amp = amp
        helper.store_for_inference(stored, session.model, session.frozen_global)
        with torch.inference_mode():
            return session, session.run(helper.to_batch(samples, session.device, with_labels=False)).images[0]

    _, fp32 = predict(None, None)
    _, autocast = predict(torch.bfloat16, None)
    session, stored = predict(torch.bfloat16, torch.bfloat16)
    nets = [session.model] + ([session.frozen_global] if session.frozen_global is not None else [])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for net in nets for m in net.modules())
    convs = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.bias is not None and m.bias.dtype == torch.bfloat16 for m in convs)

    def errors(result):
        return [(result.global_logits - fp32.global_logits).abs().max()] + [
            (result.patch_logits(kind) - fp32.patch_logits(kind)).abs().max() for kind in STAGES[stage].predictions[1:]
        ]

    for stored_error, autocast_error in zip(errors(stored), errors(autocast)):
        assert 0 < stored_error <= 2 * autocast_error


def test_store_for_inference_without_autocast_keeps_fp32():
    model = GLNet(7, "resnet18")
    helper.store_for_inference(None, model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_micro_batch_defaults_to_one_patch_on_the_cpu_and_the_sub_batch_on_a_gpu():
    session = _session(Stage.LOCAL2GLOBAL)
    assert session.sub_batch_size == 4 and session.micro_batch == 1
    session.device = torch.device("cuda")
    assert session.micro_batch == 4
    session.micro_batch_size = 9
    assert session.micro_batch == 9


def test_predicting_one_kind_gives_that_kind_of_all():
    session = _session(Stage.LOCAL2GLOBAL)
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    samples = {"id": ["a"], "image": [image], "global": [global_image(image, (64, 64))], "label": [None]}
    every = helper.predict(session, samples)[0]
    final = helper.predict(session, samples, kinds=("ensemble",))[0]
    assert every.keys() == AUTHORS_PREDICTIONS[Stage.LOCAL2GLOBAL] and final.keys() == {"ensemble"}
    assert all(pred.shape == (100, 150) for pred in every.values())
    assert torch.equal(final["ensemble"], every["ensemble"])


@pytest.mark.parametrize("stage", list(Stage))
def test_tta_scores_turn_with_the_image(stage):
    # Summing over all eight transforms, TTA(T(x)) = T(TTA(x)) for any network, but only if
    # each transform's global image and patches are cut from the transformed image (the
    # authors' patches came from the unrotated one), and only if all eight are summed. A
    # quarter turn of a non-square image also changes its patch grid (the authors crashed).
    session = _session(stage)
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    k, flip = 1, True

    def scores(img):
        samples = {"id": ["a"], "image": [img], "label": [None]}
        return helper.tta_scores(session, samples, session.predictions)[0]

    plain, turned = scores(image), scores(helper._transform(image, k, flip))
    assert plain.keys() == turned.keys() == AUTHORS_PREDICTIONS[stage]
    for kind in plain:
        assert plain[kind].shape == (7, 100, 150) and turned[kind].shape == (7, 150, 100)
        torch.testing.assert_close(turned[kind], helper._transform(plain[kind], k, flip), rtol=1e-5, atol=1e-4)


def test_confusion_matrix_iou_and_miou():
    conf = ConfusionMatrix(4)
    label = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    conf.update(pred, label)
    assert conf.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = conf.iou()
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(iou[3])
    # Class 3 is absent from truth and prediction: it counts as 0 in the mean.
    assert conf.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 0) / 4)
    assert conf.miou(ignore=(0,)) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        conf.update(pred[:3], label)


def test_confusion_matrix_counts_the_same_in_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (37, 41), generator=generator)
    pred = torch.randint(0, 5, (37, 41), generator=generator).to(torch.uint8)
    whole = ConfusionMatrix(5)
    whole.update(pred, label)
    monkeypatch.setattr(metrics, "UPDATE_CHUNK", 100)  # 16 chunks, the last one short
    chunked = ConfusionMatrix(5)
    chunked.update(pred, label)
    assert torch.equal(chunked.matrix, whole.matrix) and int(whole.matrix.sum()) == 37 * 41
