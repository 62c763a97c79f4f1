"""Heat maps: exact CAM arithmetic, every method on CNN and ViT grids, frozen weights stay frozen."""

import numpy as np
import pytest
import torch

from heatssl.errors import ArgumentError, CheckpointError
from heatssl.explain.cam import (
    METHODS,
    ProbedBackbone,
    class_maps,
    frozen,
    gradient_layer,
    heatmaps,
    resolve_targets,
)
from heatssl.model.backbone import Backbone
from heatssl.model.heads import LinearHead


def _trained_head(dim, classes=3, seed=0):
    torch.manual_seed(seed)
    head = LinearHead(dim, classes)
    head.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(20):
            head(torch.randn(32, dim) * 3 + 1)
        head.fc.weight.normal_()
        head.fc.bias.normal_()
    return head.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return Backbone("test_resnet", image_size=64, check_size=False).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return Backbone("test_vit", image_size=64, patch_size=8, check_size=False).eval()


def test_cam_is_the_weighted_sum_and_averages_to_the_logit(resnet):
    head = _trained_head(resnet.num_features)
    images = torch.randn(3, 3, 96, 64)
    with torch.no_grad():
        grid = resnet(images)
        maps = class_maps(grid, head)
        logits = head(grid.mean(dim=(-2, -1)))
    weight, bias = head.folded()
    by_hand = torch.zeros_like(maps)
    for c in range(weight.shape[0]):
        for k in range(weight.shape[1]):
            by_hand[:, c] += weight[c, k] * grid[:, k]
    torch.testing.assert_close(maps, by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps.mean(dim=(-2, -1)), logits - bias, rtol=1e-4, atol=1e-4)
    result = heatmaps(resnet, head, images, method="cam")
    target = logits.argmax(dim=1)
    np.testing.assert_allclose(
        result.raw, maps[torch.arange(3), target].numpy(), rtol=1e-4, atol=1e-5
    )
    assert result.targets.tolist() == target.tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_every_method_gives_one_finite_map_per_image(request, method, which):
    backbone = request.getfixturevalue(which)
    head = _trained_head(backbone.num_features)
    images = torch.randn(2, 3, 64, 96)  # non-square: the grid comes from the model
    before = [p.detach().clone() for p in backbone.parameters()]
    result = heatmaps(backbone, head, images, method=method)
    assert result.maps.shape == (2, 64, 96)
    assert np.isfinite(result.maps).all()
    assert result.maps.min() >= 0 and result.maps.max() <= 1 + 1e-6
    # no gradients leak into the frozen backbone or head, and nothing changed
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is None for p in head.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))


def test_gradient_cams_hook_the_block_before_the_probed_stage_s_last(resnet, vit):
    assert gradient_layer(resnet)[0] == "layer3"  # test_resnet's stages hold one block each
    assert gradient_layer(vit)[0] == "blocks.4"  # the probed grid is blocks.5's output
    deep = Backbone("resnet18", image_size=128)
    assert gradient_layer(deep)[0] == "layer4.0"
    assert gradient_layer(torch.nn.Conv2d(3, 8, 3)) is None  # not a timm adapter: the grid


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_gradcam_differs_from_cam_where_it_used_to_equal_it(request, which, monkeypatch):
    """On the probed grid Grad-CAM is ReLU(cam) (a linear head on average pooling): the default
    layer must show something else; ``cam`` itself stays the exact weighted sum."""
    import cv2

    from heatssl.explain import cam as cam_module

    backbone = request.getfixturevalue(which)
    head = _trained_head(backbone.num_features)
    with torch.no_grad():
        head.fc.weight.abs_()  # a class with positive cells to show
    images = torch.randn(4, 3, 128, 128)
    cam = heatmaps(backbone, head, images, method="cam", target=0)
    relu = np.maximum(cam.raw, 0.0)
    assert (relu.reshape(4, -1).max(1) > 0).all()
    relu = relu - relu.reshape(4, -1).min(1)[:, None, None]
    relu = relu / (1e-7 + relu.reshape(4, -1).max(1)[:, None, None])
    relu_cam = np.stack([cv2.resize(m, (128, 128)) for m in relu])  # as grad-cam scales a map
    grad = heatmaps(backbone, head, images, method="gradcam", target=0)
    assert cam.layer == "grid" and grad.layer == gradient_layer(backbone)[0]
    monkeypatch.setattr(cam_module, "gradient_layer", lambda b: None)  # the old hook: the grid
    on_grid = heatmaps(backbone, head, images, method="gradcam", target=0)
    # (a tiny random ViT changes little in one block: 0.016 mean, 0.20 at most; resnet 0.12, 0.58)
    assert np.abs(on_grid.maps - grad.maps).max() > 0.1
    assert on_grid.layer == "grid" and np.abs(on_grid.maps - relu_cam).mean() < 0.02


def test_frozen_restores_flags():
    model = torch.nn.Linear(2, 2)
    model.weight.requires_grad_(False)
    model.train()
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert not model.weight.requires_grad and model.bias.requires_grad and model.training


def test_targets_and_bad_inputs(resnet):
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.1]])
    assert resolve_targets(logits, None, None).tolist() == [1, 0]
    assert resolve_targets(logits, "c", ["a", "b", "c"]).tolist() == [2, 2]
    with pytest.raises(ArgumentError, match=r"target='zebra' is not a class name.*a, b, c"):
        resolve_targets(logits, "zebra", ["a", "b", "c"])
    with pytest.raises(ArgumentError, match="out of range"):
        resolve_targets(logits, 5, None)
    with pytest.raises(CheckpointError, match="takes 7-d features"):
        ProbedBackbone(resnet, LinearHead(7, 3))
    with pytest.raises(ArgumentError, match=r"method='lime' is not allowed"):
        heatmaps(resnet, _trained_head(resnet.num_features), torch.randn(1, 3, 64, 64), "lime")


def test_named_target_changes_the_cam(resnet):
    head = _trained_head(resnet.num_features)
    images = torch.randn(2, 3, 64, 64)
    names = ["a", "b", "c"]
    maps = [heatmaps(resnet, head, images, "cam", t, names).raw for t in names]
    assert not np.allclose(maps[0], maps[1])
