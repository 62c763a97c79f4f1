"""The LightningModule: lr rule, schedule, optimiser groups, logged parts, pictures."""

import math

import pytest
import torch

from heatssl.config import load_config
from heatssl.errors import CheckpointError
from heatssl.runs.sources import drop_pruned_layers
from heatssl.train.pretrain_module import HeatPretrainModule


def test_lr_follows_batch_without_trainer(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "data.batch_size=128", "optim.base_lr=1e-3"])
    module = HeatPretrainModule(cfg)
    assert module.learning_rate() == pytest.approx(1e-3 * 128 / 256)


def test_checkpoint_hparams_are_plain_and_rebuild_the_model(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    module = HeatPretrainModule(cfg)
    hp = dict(module.hparams)
    assert hp["config"] == cfg.to_dict()
    rebuilt = HeatPretrainModule(hp["config"])
    assert rebuilt.qbheat.backbone.name == "test_resnet"
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in module.parameters()
    )


def test_reconstruct_returns_pictures_in_unit_range(tiny_overrides):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))
    images = torch.randn(4, 3, 32, 32)
    shown, mask, recon = module.reconstruct(images)
    assert shown.shape == recon.shape == (4, 3, 32, 32)
    assert mask.shape == (4, 1, 32, 32)
    # one quadrant of four kept per image, each image a different quadrant
    assert torch.allclose(mask.mean(dim=(1, 2, 3)), torch.full((4,), 0.75))
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 4
    assert recon.min() >= 0 and recon.max() <= 1
    assert module.qbheat.training  # restored


def test_heat_operators_are_not_weight_decayed(tiny_overrides):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))

    class _Trainer:
        estimated_stepping_batches = 10
        max_epochs = 2
        world_size = 1
        accumulate_grad_batches = 1

    module._trainer = _Trainer()  # the optimiser only needs these numbers
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    ops = module.qbheat.predictor.operators
    assert id(ops.A) not in decayed and id(ops.B) not in decayed
    assert any(p.ndim == 4 for p in opt.param_groups[0]["params"])  # conv weights are decayed
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(module.learning_rate())
    assert math.isclose(opt.param_groups[0]["weight_decay"], 0.05)


def test_grad_checkpointing_recomputes_and_gives_the_same_gradients(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    images = torch.randn(4, 3, 32, 32)
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = HeatPretrainModule(cfg)
        if checkpointing:
            module.backbone.set_grad_checkpointing(True)
        count = [0]
        stage = module.backbone.model.layer1[0]  # checkpoint_seq calls the blocks one by one
        # a pre-hook: torch stops a recomputation early, once the tensors it needs are back
        stage.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        module.qbheat(images, quadrant=torch.zeros(4, dtype=torch.long)).loss.backward()
        grads.append(
            {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        )
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed stage runs again in the backward pass
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_channels_last_and_compile_settings_apply(tiny_overrides):
    cfg = load_config(
        "demo", [*tiny_overrides, "trainer.channels_last=true", "trainer.compile=true"]
    )
    module = HeatPretrainModule(cfg)
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    module.configure_model()
    assert module.qbheat._compiled_call_impl is not None  # the whole objective, one graph


@pytest.mark.parametrize(
    "recipe_overrides",
    [[], ["model.backbone=test_vit", "model.output_stride=null", "model.kwargs={patch_size: 4}"]],
)
def test_the_whole_qbheat_step_compiles_without_a_graph_break(tiny_overrides, recipe_overrides):
    """fullgraph=True raises at the first graph break (dynamo only, no code generation)."""
    module = HeatPretrainModule(load_config("demo", [*tiny_overrides, *recipe_overrides]))
    compiled = torch.compile(module.qbheat, fullgraph=True, backend="eager")
    out = compiled(torch.randn(4, 3, 32, 32))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.heat is not None and out.commute is not None
    with torch.no_grad():  # the pictures' forward: quadrants given by the caller
        given = compiled(torch.randn(4, 3, 32, 32), quadrant=torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(given.loss)


def test_a_checkpoint_holding_pruned_layers_still_loads(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "model.stage=-2", "data.image_size=32"])
    module = HeatPretrainModule(cfg)
    old = dict(module.state_dict())
    old["qbheat.backbone.model.layer4.0.conv1.weight"] = torch.zeros(1)  # written before pruning
    with pytest.raises(RuntimeError, match="Unexpected key"):
        HeatPretrainModule(cfg).load_state_dict(old)
    fresh = HeatPretrainModule(cfg)
    fresh.load_state_dict(drop_pruned_layers(fresh, old, "qbheat.backbone.model."))
    other = {"qbheat.decoder.unknown": torch.zeros(1)}  # only the backbone's pruned layers go
    assert "qbheat.decoder.unknown" in drop_pruned_layers(
        fresh, {**old, **other}, "qbheat.backbone.model."
    )


def test_resuming_a_checkpoint_from_before_pruning_is_refused_with_the_reason(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "model.stage=-2", "data.image_size=32"])
    module = HeatPretrainModule(cfg)
    state = {**module.state_dict(), "qbheat.backbone.model.layer4.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        module.on_load_checkpoint({"state_dict": dict(state), "optimizer_states": [{}]})
    weights_only = {"state_dict": dict(state)}  # what probe and export read: it loads
    module.on_load_checkpoint(weights_only)
    assert "qbheat.backbone.model.layer4.0.conv1.weight" not in weights_only["state_dict"]


VIT = ["model.backbone=test_vit", "model.output_stride=null", "model.kwargs={patch_size: 4}"]


def test_compile_options_survive_a_second_batch_shape_with_backward(tiny_overrides, monkeypatch):
    """A ViT's quarter resamples its position table (bicubic, antialiased). On the first GPU run
    (torch 2.11) a recompile with dynamic shapes failed in torch's backward meta of that op
    ("Expected IntList but got GenericList"; here, torch 2.14, it fails with dynamic=True).
    The module compiles with static shapes; the options then carry a ViT's step with backward
    through two batch shapes (aot_eager: the same autograd tracing as inductor, no codegen)."""
    module = HeatPretrainModule(
        load_config("demo", [*tiny_overrides, *VIT, "trainer.compile=true"])
    )
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update(kw))
    module.configure_model()
    assert seen["dynamic"] is False and seen["mode"] == "default"
    torch._dynamo.reset()
    options = {k: v for k, v in seen.items() if k != "mode"}
    compiled = torch.compile(module.qbheat, backend="aot_eager", **options)
    for batch in (4, 2):  # the second shape recompiles
        out = compiled(torch.randn(batch, 3, 32, 32))
        out.loss.backward()
        assert torch.isfinite(out.loss)
    torch._dynamo.reset()


def test_bf16_mixed_precision_clips_gradients_with_fused_adamw(tiny_overrides):
    """Lightning refuses to clip for a fused optimiser under any AMP plugin, bf16 included (it
    has no gradient scaler there, so clipping is exact): found on the first GPU run, where every
    recipe stopped at its first step. The module clips itself in that case."""
    cfg = load_config("demo", [*tiny_overrides, "trainer.precision=bf16-mixed"])
    module = HeatPretrainModule(cfg)
    params = list(module.qbheat.parameters())
    opt = torch.optim.AdamW(params, fused=True)
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total == pytest.approx(1.0, rel=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert all(float(p.grad.max()) == pytest.approx(0.5) for p in params)


def test_the_reconstruction_pictures_never_run_the_compiled_graph(tiny_overrides):
    """A picture batch (8 images, eval mode) through the compiled forward compiled a second graph
    on process 0 at an epoch end while every other process waited at the next collective."""
    module = HeatPretrainModule(load_config("demo", tiny_overrides))

    def compiled(*args, **kwargs):
        raise AssertionError("the picture ran the compiled graph")

    module.qbheat._compiled_call_impl = compiled  # what nn.Module.compile installs
    shown, mask, recon = module.reconstruct(
        torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    )
    assert recon.shape == shown.shape == (3, 3, 32, 32) and mask.shape == (3, 1, 32, 32)
