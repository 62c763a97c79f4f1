"""Tests for heatssl.model.teacher: the EMA teacher, its momentum schedule, the latent loss, and
QB-Heat's ``target=teacher / both`` end to end (model, config, a Lightning run, its checkpoint)."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch

from heatssl.cli import main
from heatssl.config import ConfigError, load_config
from heatssl.errors import ArgumentError
from heatssl.model.optim import weight_decay_groups
from heatssl.model.quadrants import crop_quadrant
from heatssl.model.teacher import (
    EmaTeacher,
    colour_jitter,
    feature_spread,
    global_loss,
    latent_loss,
    standardize_cells,
    teacher_momentum,
)
from heatssl.runs.checkpoints import safe_torch_load
from heatssl.runs.sources import qbheat_from_checkpoint
from tests.helpers import tiny_settings
from tests.model.test_qbheat import RESNET_OS16, VIT, _images, _model

# --------------------------------------------------------------------------- the teacher itself


def test_teacher_gets_no_gradient_and_is_not_optimised():
    model = _model(target="both", heat_dim=8)
    model.train()
    model(_images(4, 64)).loss.backward()
    teacher = list(model.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert any(p.grad is not None for p in model.backbone.parameters())  # the student learns
    in_optimiser = {id(p) for g in weight_decay_groups(model, 0.05) for p in g["params"]}
    assert in_optimiser and not in_optimiser & {id(p) for p in teacher}
    student = [p for n, p in model.named_parameters() if not n.startswith("teacher.")]
    assert in_optimiser == {id(p) for p in student}


def test_teacher_stays_in_eval_mode():
    model = _model(target="teacher")
    model.train()
    assert model.backbone.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())


def test_momentum_schedule_start_middle_end():
    assert teacher_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert teacher_momentum(0.996, 0.5) == pytest.approx(0.998)
    assert teacher_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert teacher_momentum(0.9, 2.0) == pytest.approx(1.0)  # clamped past the end
    assert teacher_momentum(0.9, 0.25) < teacher_momentum(0.9, 0.75)
    with pytest.raises(ArgumentError, match=r"base=1.5 must be in \[0, 1\]"):
        teacher_momentum(1.5, 0.0)


def test_update_moves_the_teacher_by_one_minus_momentum():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    project = torch.nn.Conv2d(4, 2, 1, bias=False)
    teacher = EmaTeacher(student, project)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in [*student.parameters(), *project.parameters()]:
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(4, 3, 6, 6))  # new BatchNorm running statistics
    m = 0.9
    teacher.update(student, project, m)
    for key, value in teacher.backbone.state_dict().items():
        s = student.state_dict()[key]
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(value, s)  # buffers are copied
        else:
            torch.testing.assert_close(value, m * before[f"backbone.{key}"] + (1 - m) * s)
    expected = m * before["project.weight"] + (1 - m) * project.weight
    torch.testing.assert_close(teacher.project.weight, expected)
    with pytest.raises(ArgumentError, match=r"momentum=-0\.1"):
        teacher.update(student, project, -0.1)


# --------------------------------------------------------------------------- the latent loss


def test_latent_loss_scores_only_the_hidden_cells():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 4, 4)
    pred = standardize_cells(target).clone()
    q = torch.tensor([0, 3])
    pred[0, :, :2, :2] = 100.0  # the kept quadrants: not scored
    pred[1, :, 2:, 2:] = -100.0
    for kind in ("smooth_l1", "cosine"):
        assert latent_loss(pred, target, q, kind).item() == pytest.approx(0.0, abs=1e-5)
    pred[0, :, 3, 3] += 1.0  # one hidden cell off by 1 in every channel
    assert latent_loss(pred, target, q, "smooth_l1").item() == pytest.approx(0.5 / 24)
    with pytest.raises(ArgumentError, match=r"teacher's grid \[2, 6, 2, 2\]"):
        latent_loss(pred, target[..., :2, :2], q, "smooth_l1")
    with pytest.raises(ArgumentError, match="latent_loss='l2' is not allowed"):
        latent_loss(pred, target, q, "l2")


def test_teacher_spread_is_zero_for_a_collapsed_teacher():
    model = _model(target="both")
    images = _images(6, 64)
    assert model(images).teacher_spread.item() > 1e-4
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.zero_()
    out = model(images)
    assert out.teacher_spread.item() == pytest.approx(0.0, abs=1e-7)
    assert feature_spread(torch.ones(5, 3, 2, 2)).item() == 0.0


# --------------------------------------------------------------------------- QB-Heat with targets


def test_pixel_target_builds_no_teacher_and_keeps_the_loss():
    images, q = _images(4, 64), torch.tensor([0, 1, 2, 3])
    default, pixels = _model(), _model(target="pixels", teacher_weight=5.0, pixel_weight=3.0)
    assert pixels.teacher is None and not any(k.startswith("teacher.") for k in pixels.state_dict())
    a, b = default(images, quadrant=q), pixels(images, quadrant=q)
    assert a.latent is None and b.latent is None and b.teacher_spread is None
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
@pytest.mark.parametrize("target", ["teacher", "both"])
@pytest.mark.parametrize("kind", ["smooth_l1", "cosine"])
def test_teacher_targets_train(spec, target, kind):
    model = _model(spec, target=target, latent_loss=kind, heat_dim=8)
    model.train()
    out = model(_images(4, spec[1]))
    assert torch.isfinite(out.latent) and out.latent.item() > 0
    assert torch.isfinite(out.loss) and out.teacher_spread.item() > 0
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.backbone.model.patch_embed.proj.weight.grad is not None if spec is VIT else True


def test_teacher_target_gives_the_encoder_no_pixel_gradient():
    """target=teacher: the decoder trains on the detached grid, the encoder on the latent only."""
    model = _model(target="teacher", teacher_weight=0.0, heat_weight=0.0, commute_weight=0.0)
    model.train()
    model(_images(4, 64)).loss.backward()
    decoder = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None for g in decoder) and any(g.abs().sum() > 0 for g in decoder)
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in grads)
    both = _model(target="both", teacher_weight=0.0, heat_weight=0.0, commute_weight=0.0)
    both.train()
    both(_images(4, 64)).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in both.backbone.parameters())


def test_a_latent_head_sits_between_the_grid_and_the_latent_loss_only():
    """loss.latent_head: a per-cell MLP the latent loss sees; the pixels and pixel runs do not."""
    images, q = _images(4, 64), torch.tensor([0, 1, 2, 3])
    plain = _model(target="both", heat_dim=8)
    headed = _model(target="both", heat_dim=8, latent_head=16)
    assert isinstance(plain.latent_head, torch.nn.Identity)
    assert _model(target="pixels", latent_head=16).latent_head.__class__ is torch.nn.Identity
    headed.load_state_dict(plain.state_dict(), strict=False)  # all but the head's weights
    a, b = plain(images, quadrant=q), headed(images, quadrant=q)
    torch.testing.assert_close(a.rec, b.rec)  # the decoder sees the heat operators' grid
    assert not torch.allclose(a.latent, b.latent)
    b.loss.backward()
    assert all(p.grad is not None for p in headed.latent_head.parameters())


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
def test_a_half_resolution_teacher_sees_half_the_image_and_scores_the_pooled_grid(spec):
    model = _model(spec, target="teacher", teacher_resolution="half", global_weight=1.0)
    seen = []
    model.teacher.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    size = spec[1]
    images, q = _images(4, size), torch.tensor([0, 1, 2, 3])
    out = model(images, quadrant=q)
    assert seen == [torch.Size([4, 3, size // 2, size // 2])]
    assert torch.isfinite(out.latent) and torch.isfinite(out.global_latent)
    with torch.no_grad():  # by hand: the grid averaged over 2 x 2 cells against the small grid
        z = model.project(model.backbone(crop_quadrant(images, q), quadrant=q))
        grid = torch.nn.functional.avg_pool2d(model.predictor(z, q), 2)
        small = torch.nn.functional.interpolate(
            images, scale_factor=0.5, mode="bilinear", antialias=True
        )
        expected = latent_loss(grid, model.teacher(small), q, "smooth_l1")
    torch.testing.assert_close(out.latent, expected)


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
def test_the_global_term_pools_the_quarter_against_the_teachers_whole_image(spec):
    """loss.global_weight: 1 - cos(MLP(pooled student quarter), pooled teacher image), added in."""
    images, q = _images(4, spec[1]), torch.tensor([0, 1, 2, 3])
    base = _model(spec, target="both", heat_dim=8)
    glob = _model(spec, target="both", heat_dim=8, global_weight=0.5)
    glob.load_state_dict(base.state_dict(), strict=False)
    a, b = base(images, quadrant=q), glob(images, quadrant=q)
    assert a.global_latent is None and 0 < b.global_latent.item() < 2
    torch.testing.assert_close(b.loss, a.loss + 0.5 * b.global_latent)
    b.loss.backward()
    assert all(p.grad is not None for p in glob.global_head.parameters())
    assert all(p.grad is None for p in glob.teacher.parameters())


def test_global_loss_cosine_and_infonce_by_hand():
    torch.manual_seed(0)
    pred = torch.randn(5, 6, requires_grad=True)
    aim = torch.randn(5, 6, requires_grad=True)
    cos = torch.nn.functional.cosine_similarity
    by_hand = 1 - cos(pred, aim, dim=1).mean()
    torch.testing.assert_close(global_loss(pred, aim, "cosine"), by_hand)
    sims = torch.stack([cos(pred[i : i + 1], aim, dim=1) for i in range(5)])  # (pred i, aim j)
    nce = -(sims.diagonal() / 0.5 - torch.logsumexp(sims / 0.5, dim=1)).mean()
    torch.testing.assert_close(global_loss(pred, aim, "infonce", 0.5), nce)
    global_loss(pred, aim, "infonce").backward()
    assert pred.grad is not None and aim.grad is None  # the teacher's pools are targets only
    # matched rows far from the others score near 0; a batch that tells nothing apart, log N
    rows = torch.eye(8)
    assert global_loss(rows, rows * 3.0, "infonce", 0.1).item() < 1e-3
    assert global_loss(torch.ones(8, 8), torch.ones(8, 8), "infonce").item() == pytest.approx(
        math.log(8), abs=1e-5
    )
    with pytest.raises(ArgumentError, match=r"temperature=0\.0 must be > 0"):
        global_loss(pred, aim, "infonce", 0.0)
    with pytest.raises(ArgumentError, match=r"global_loss='l2' is not allowed"):
        global_loss(pred, aim, "l2")


def test_the_infonce_global_term_scores_the_pooled_quarter_against_the_batchs_teacher_pools():
    images, q = _images(4, RESNET_OS16[1]), torch.tensor([0, 1, 2, 3])
    model = _model(target="both", heat_dim=8, global_weight=0.5, global_loss="infonce")
    model.train()
    out = model(images, quadrant=q)
    with torch.no_grad():
        z = model.project(model.backbone(crop_quadrant(images, q), quadrant=q))
        goal = model.teacher_grid(images)
        pooled = model.global_head(z.mean(dim=(-2, -1)))
    expected = global_loss(pooled, goal.mean(dim=(-2, -1)), "infonce", 0.2)
    torch.testing.assert_close(out.global_latent, expected)
    assert load_config("demo", ["loss.target=both"]).loss.global_loss == "cosine"  # the default
    with pytest.raises(ConfigError, match=r"loss\.global_temperature"):
        load_config("demo", ["loss.target=both", "loss.global_temperature=-1"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(global_weight=1.0), "global_weight=1.0 needs an EMA teacher"),
        (dict(teacher_resolution="quarter"), "teacher_resolution='quarter' is not allowed"),
        (dict(latent_head=-1), "latent_head=-1 must be >= 0"),
        (dict(view_jitter=0.5), "view_jitter=0.5 needs an EMA teacher"),
        (dict(target="both", view_jitter=1.5), r"view_jitter=1.5 must be in \[0, 1\]"),
        (dict(target="latent"), "target='latent' is not allowed. Allowed: 'pixels', 'teacher'"),
        (dict(latent_loss="mse"), "latent_loss='mse' is not allowed"),
        (dict(global_loss="nce"), "global_loss='nce' is not allowed. Allowed: 'cosine', 'infonce'"),
        (dict(global_temperature=0.0), "global_temperature=0.0 must be > 0"),
        (dict(teacher_momentum=1.2), r"teacher_momentum=1.2 must be in \[0, 1\]"),
        (dict(teacher_weight=-1.0), "teacher_weight=-1.0 must be >= 0"),
        (dict(pixel_weight=float("nan")), "pixel_weight=nan must be >= 0"),
    ],
)
def test_bad_teacher_arguments_are_refused(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        _model(**kwargs)


def test_config_keys_are_checked():
    cfg = load_config("demo", ["loss.target=both", "loss.latent_loss=cosine"])
    assert cfg.loss.target == "both" and cfg.loss.latent_loss == "cosine"
    assert load_config("demo").loss.target == "pixels"
    with pytest.raises(ConfigError, match=r"loss\.teacher_momentum=2\.0"):
        load_config("demo", ["loss.teacher_momentum=2.0"])
    with pytest.raises(ConfigError, match=r"loss\.target"):
        load_config("demo", ["loss.target=latent"])
    for bad in (["loss.view_jitter=0.5"], ["loss.target=both", "loss.view_jitter=-0.1"]):
        with pytest.raises(ConfigError, match=r"loss\.view_jitter=.*fix: loss\.view_jitter=1\.0"):
            load_config("demo", bad)


# --------------------------------------------------------------------------- two colourings


def test_colour_jitter_draws_per_image_colourings_that_stay_images():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    torch.manual_seed(0)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    images = (torch.rand(400, 3, 8, 8) - mean) / std  # valid images in [0, 1], normalised
    assert colour_jitter(images, 0.0) is images
    out = colour_jitter(images, 1.0)
    raw = out * std + mean
    assert out.shape == images.shape and raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    changed = (out - images).abs().flatten(1).amax(dim=1) > 1e-3
    assert 0.7 < changed.float().mean() < 0.95  # jittered with p 0.8, or turned grey with p 0.2
    grey = (raw.amax(dim=1) - raw.amin(dim=1)).flatten(1).amax(dim=1) < 1e-4
    assert 0.1 < grey.float().mean() < 0.3  # grey with probability 0.2 * strength
    mild = colour_jitter(images, 0.25) * std + mean  # a quarter of the strength: smaller changes
    assert (mild - images * std - mean).abs().mean() < (raw - images * std - mean).abs().mean() / 2
    with pytest.raises(ArgumentError, match=r"view_jitter=-1 must be in \[0, 1\]"):
        colour_jitter(images, -1)


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
def test_view_jitter_gives_student_and_teacher_two_colourings_while_training_only(spec):
    model = _model(spec, target="both", heat_dim=8, global_weight=1.0, view_jitter=1.0)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for name, net in (("student", model.backbone), ("teacher", model.teacher.backbone)):
        net.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
    images, q = _images(8, spec[1]), torch.zeros(8, dtype=torch.long)  # kept quadrant 0
    torch.manual_seed(1)
    model.train()
    out = model(images, quadrant=q)
    student, teacher = seen["student"][-1], seen["teacher"][-1]
    half = spec[1] // 2
    assert not torch.allclose(student, crop_quadrant(images, q))  # the student's view is jittered
    assert not torch.allclose(teacher[..., :half, :half], student)  # and the teacher's another
    torch.manual_seed(1)  # the pixel target is the student's own view
    view = colour_jitter(images, 1.0)
    torch.testing.assert_close(student, crop_quadrant(view, q))
    assert torch.isfinite(out.loss)
    model.eval()  # pictures and evaluation see the images as they are
    model(images, quadrant=q)
    torch.testing.assert_close(seen["student"][-1], crop_quadrant(images, q))
    torch.testing.assert_close(seen["teacher"][-1], images)


# --------------------------------------------------------------------------- a Lightning run


def test_pretrain_with_teacher_saves_and_restores_it(tmp_path, capsys):
    settings = [*tiny_settings(tmp_path / "run"), "loss.target=both", "loss.teacher_momentum=0.9"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    # the start line counts the model without its frozen copy, and names the copy apart
    assert re.search(r"M parameters \(\+ [0-9.]+ M in the EMA teacher\)", capsys.readouterr().err)
    folder = tmp_path / "run"
    ckpt = folder / "checkpoints" / "last.ckpt"
    state = safe_torch_load(ckpt)["state_dict"]
    teacher = {k.removeprefix("qbheat.teacher."): v for k, v in state.items() if ".teacher." in k}
    assert teacher and all(f"qbheat.{k}" in state for k in teacher)
    moved = [k for k, v in teacher.items() if v.is_floating_point() and "running" not in k]
    differ = [k for k in moved if not torch.equal(teacher[k], state[f"qbheat.{k}"])]
    assert differ, "the teacher should lag the trained student"
    for k in teacher:  # buffers are copied from the student
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(teacher[k], state[f"qbheat.{k}"])
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/latent", "train/teacher_spread", "train/rec"} <= logged
    spread = [float(r["train/teacher_spread"]) for r in rows if r.get("train/teacher_spread")]
    assert all(s > 0 for s in spread)

    cfg, qbheat = qbheat_from_checkpoint(ckpt)  # a fresh model: the teacher comes from the file
    assert cfg.loss.target == "both"
    for k, v in qbheat.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher[k], rtol=0, atol=0)

    # --resume: the run continues from the saved teacher (the optimiser state fits: no teacher)
    more = [*settings, "trainer.max_epochs=2"]
    assert main(["pretrain", "-c", "demo", *more, "--resume", "last"]) == 0
    resumed = safe_torch_load(ckpt)["state_dict"]
    assert any(not torch.equal(resumed[f"qbheat.teacher.{k}"], teacher[k]) for k in moved)


def test_teacher_updates_once_per_optimiser_step_on_the_schedule(tmp_path, monkeypatch):
    """Gradient accumulation: one update per optimiser step, momenta rising from the base to 1."""
    from heatssl.model.qbheat import QBHeat

    momenta: list[float] = []
    real = QBHeat.update_teacher

    def spy(self, momentum):
        momenta.append(momentum)
        real(self, momentum)

    monkeypatch.setattr(QBHeat, "update_teacher", spy)
    settings = [*tiny_settings(tmp_path / "run"), "loss.target=teacher", "data.batch_size=4"]
    settings += ["trainer.accumulate_grad_batches=2", "loss.teacher_momentum=0.9"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    step = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"]
    assert step > 1 and len(momenta) == step
    expected = [teacher_momentum(0.9, i / step) for i in range(step)]  # steps done before it
    assert momenta == pytest.approx(expected)
