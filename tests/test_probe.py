"""Tests for heatssl.probe: linear / tran-1 / kNN probes on synthetic cached features."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from heatssl.config import ConfigError, ProbeConfig
from heatssl.features import FeatureCache, FeatureSet
from heatssl.probe import (
    LinearHead,
    Tran1Head,
    knn_scores,
    load_head,
    metrics_markdown,
    predict,
    run_probes,
    save_head,
    topk_accuracy,
    train_head,
)


def _clusters(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 4.0):
    """Gaussian clusters with well separated means (shared across seeds), labels interleaved."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * spread
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=gen)
    return x + 3.0, labels  # an offset the BatchNorm has to remove


def _grids(n_per_class: int, classes: int, d: int, seed: int):
    """(N, d, 2, 2) grids: a fixed random pattern of 4 tokens per class (shared across seeds) + noise."""
    patterns = torch.randn(classes, 4, d, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    tokens = patterns[labels] + torch.randn(len(labels), 4, d, generator=gen)
    return tokens.transpose(1, 2).reshape(len(labels), d, 2, 2), labels


def _train_linear(x, y, classes, epochs=20, seed=0):
    head = LinearHead(x.shape[1], classes)
    train_head(head, x, y, epochs, 64, "sgd", base_lr=1.0, warmup_epochs=1, seed=seed)
    return head


# ------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_clusters():
    torch.manual_seed(0)
    x_tr, y_tr = _clusters(60, 4, 16, seed=1)
    x_te, y_te = _clusters(100, 4, 16, seed=2)
    head = LinearHead(16, 4)
    history = train_head(head, x_tr, y_tr, 20, 64, "sgd", base_lr=1.0, warmup_epochs=1)
    assert len(history) == 20 and all(math.isfinite(v) for v in history)
    assert history[-1] < history[0]
    assert not head.training  # left in eval mode
    scores = predict(head, x_te, batch_size=70)  # several batches, the last partial
    assert scores.shape == (400, 4)
    acc = topk_accuracy(scores, y_te, 4)
    assert acc["top1"] >= 95.0
    assert acc["top5"] == pytest.approx(100.0)  # top-4 of 4 classes


def test_linear_probe_random_labels_is_chance_on_held_out():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    x_tr = torch.randn(256, 16, generator=gen)
    y_tr = torch.randint(0, 4, (256,), generator=gen)
    x_te = torch.randn(2000, 16, generator=gen)
    y_te = torch.randint(0, 4, (2000,), generator=gen)
    head = _train_linear(x_tr, y_tr, 4, epochs=30)
    train_acc = topk_accuracy(predict(head, x_tr), y_tr, 4)["top1"]
    test_acc = topk_accuracy(predict(head, x_te), y_te, 4)["top1"]
    assert test_acc < 40.0
    assert train_acc > test_acc  # it did fit something, which does not transfer


def test_train_head_is_deterministic_given_seed():
    x, y = _clusters(20, 3, 8, seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        head = _train_linear(x, y, 3, epochs=3, seed=11)
        outs.append(predict(head, x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_unknown_optimizer_raises():
    x, y = _clusters(4, 2, 4, seed=0)
    with pytest.raises(ConfigError, match="optimizer"):
        train_head(LinearHead(4, 2), x, y, 1, 4, "rmsprop", 0.1)


# ------------------------------------------------------------------------------------ topk_accuracy


def test_topk_accuracy_hand_computed():
    scores = torch.tensor(
        [
            # classes: 0    1    2    3    4    5
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5 -> top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6 -> miss
            [0.0, 0.0, 0.0, 0.9, 0.8, 0.0],  # label 4: rank 2 -> top-5 hit only
        ]
    )
    labels = torch.tensor([0, 1, 5, 4])
    acc = topk_accuracy(scores, labels, 6)
    assert acc["top1"] == pytest.approx(25.0)
    assert acc["top5"] == pytest.approx(75.0)


def test_topk_accuracy_three_classes_top5_is_top3():
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2, 1, 0])
    acc = topk_accuracy(scores, labels, 3)
    assert acc["top1"] == pytest.approx(50.0)
    assert acc["top5"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------- kNN


def _knn_reference(train, train_labels, query, classes, k, temperature):
    """Explicit loops: cosine similarity, k most similar, sum of exp(sim / T) per class."""
    out = torch.zeros(len(query), classes, dtype=torch.float64)
    tr = [[float(v) for v in row] for row in train]
    norms = [math.sqrt(sum(v * v for v in row)) for row in tr]
    for qi, q_row in enumerate(query):
        q = [float(v) for v in q_row]
        qn = math.sqrt(sum(v * v for v in q))
        sims = [
            (sum(a * b for a, b in zip(q, row, strict=True)) / (qn * n), j)
            for j, (row, n) in enumerate(zip(tr, norms, strict=True))
        ]
        sims.sort(reverse=True)
        for sim, j in sims[: min(k, len(tr))]:
            out[qi, int(train_labels[j])] += math.exp(sim / temperature)
    return out


@pytest.mark.parametrize(
    ("n_train", "n_query", "k", "chunk"),
    [(40, 13, 5, 4), (40, 13, 5, 1024), (7, 9, 20, 2)],  # chunked, one chunk, k > train (clamped)
)
def test_knn_scores_matches_bruteforce(n_train, n_query, k, chunk):
    gen = torch.Generator().manual_seed(n_train + k)
    train = torch.randn(n_train, 6, generator=gen) * 3 + 0.5
    labels = torch.randint(0, 4, (n_train,), generator=gen)
    query = torch.randn(n_query, 6, generator=gen)
    temperature = 0.5
    got = knn_scores(train, labels, query, 4, k=k, temperature=temperature, chunk=chunk)
    ref = _knn_reference(train, labels, query, 4, k, temperature)
    assert got.shape == (n_query, 4)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    if k >= n_train:  # clamped: every train point votes, so exactly the train classes score
        present = torch.zeros(4, dtype=torch.bool)
        present[labels] = True
        assert torch.equal(got > 0, present.expand(n_query, 4))


def test_knn_scores_float16_inputs_and_default_temperature():
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(30, 8, generator=gen).half()
    labels = torch.randint(0, 3, (30,), generator=gen)
    query = torch.randn(5, 8, generator=gen).half()
    got = knn_scores(train, labels, query, 3, k=4)
    ref = _knn_reference(train.float(), labels, query.float(), 3, 4, 0.07)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------- LinearHead.folded


@pytest.fixture(scope="module")
def trained_linear():
    torch.manual_seed(0)
    x, y = _clusters(30, 3, 8, seed=4)
    x = x * torch.linspace(0.5, 4.0, 8)  # unequal variances per feature
    head = _train_linear(x, y, 3, epochs=5)
    return head, x


def test_folded_matches_eval_logits(trained_linear):
    head, x = trained_linear
    assert head.bn.running_mean.abs().max() > 1.0  # BN statistics are far from (0, 1)
    assert (head.bn.running_var - 1).abs().max() > 1.0
    weight, bias = head.folded()
    assert weight.shape == (3, 8) and bias.shape == (3,)
    head.eval()
    with torch.no_grad():
        logits = head(x)
        torch.testing.assert_close(x @ weight.T + bias, logits, rtol=1e-5, atol=1e-4)


def test_folded_class_map_spatial_mean_is_logit_minus_bias(trained_linear):
    head, x = trained_linear
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(5, 8, 3, 4, generator=gen) * 2 + x[:5, :, None, None]
    weight, bias = head.folded()
    head.eval()
    with torch.no_grad():
        cam = torch.einsum("ck,nkyx->ncyx", weight, z)
        logits = head(z.mean((2, 3)))
    assert cam.shape == (5, 3, 3, 4)
    torch.testing.assert_close(cam.mean((2, 3)), logits - bias, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------- tran-1


def test_tran1_head_shape_and_heads():
    head = Tran1Head(32, 5, tokens=6)
    assert head.block.attn.num_heads == 1  # default d // 64, at least 1
    grid = torch.randn(4, 32, 2, 3)
    head.eval()
    with torch.no_grad():
        out = head(grid)
        assert out.shape == (4, 5)
        # The tokens pass through the block: with positions, their order matters ...
        head.pos.normal_()
        assert not torch.allclose(head(grid), head(grid.flip(-1)), atol=1e-3)
        # ... without positions, the block and the token mean are permutation invariant.
        head.pos.zero_()
        torch.testing.assert_close(head(grid), head(grid.flip(-1)), rtol=1e-4, atol=1e-5)
    assert Tran1Head(128, 2, tokens=4).block.attn.num_heads == 2
    assert Tran1Head(32, 2, tokens=4, heads=4).block.attn.num_heads == 4


@pytest.mark.parametrize("heads", [3, 5])
def test_tran1_heads_must_divide_width(heads):
    with pytest.raises(ConfigError, match="tran1_heads"):
        Tran1Head(16, 2, tokens=4, heads=heads)


def test_tran1_learns_separable_grids():
    torch.manual_seed(0)
    x_tr, y_tr = _grids(32, 4, 16, seed=1)
    x_te, y_te = _grids(50, 4, 16, seed=2)
    head = Tran1Head(16, 4, tokens=4, heads=2)
    history = train_head(head, x_tr, y_tr, 3, 16, "adamw", base_lr=0.2, weight_decay=0.05)
    assert len(history) == 3 and history[-1] < history[0]
    assert not head.training
    scores = predict(head, x_te.half(), batch_size=64)  # float16 grids, as in the cache
    assert scores.shape == (200, 4) and scores.dtype == torch.float32
    assert topk_accuracy(scores, y_te, 4)["top1"] >= 90.0


# ----------------------------------------------------------------------------------- save / load


def test_save_load_linear_round_trip(tmp_path, trained_linear):
    head, x = trained_linear
    names = ["a", "b", "c"]
    path = save_head(head, tmp_path / "sub" / "linear.safetensors", names, backbone="r18", epoch=3)
    assert path.is_file()
    loaded, info = load_head(path)
    assert isinstance(loaded, LinearHead) and not loaded.training
    assert info["kind"] == "linear" and info["class_names"] == names
    assert info["in_dim"] == 8 and info["num_classes"] == 3
    assert info["backbone"] == "r18" and info["epoch"] == 3
    head.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
    assert torch.equal(loaded.bn.running_var, head.bn.running_var)


def test_save_load_tran1_round_trip(tmp_path):
    torch.manual_seed(0)
    x, y = _grids(8, 3, 16, seed=3)
    head = Tran1Head(16, 3, tokens=4, heads=4)
    train_head(head, x, y, 1, 8, "adamw", base_lr=0.01)
    path = save_head(head, tmp_path / "tran1.safetensors", ["x", "y", "z"], stage=-1)
    loaded, info = load_head(path)
    assert isinstance(loaded, Tran1Head) and not loaded.training
    assert info["kind"] == "tran1" and info["class_names"] == ["x", "y", "z"]
    assert info["in_dim"] == 16 and info["num_classes"] == 3
    assert info["tokens"] == 4 and info["heads"] == 4 and info["stage"] == -1
    assert loaded.block.attn.num_heads == 4
    head.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))


def test_load_head_refuses_foreign_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, str(plain))
    with pytest.raises(ConfigError, match="not a heatssl probe head"):
        load_head(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other), metadata={"heatssl": '{"format": "other"}'})
    with pytest.raises(ConfigError):
        load_head(other)


# -------------------------------------------------------------------------------------- run_probes


@pytest.fixture(scope="module")
def cache() -> FeatureCache:
    x_tr, y_tr = _grids(32, 3, 16, seed=5)
    x_te, y_te = _grids(20, 3, 16, seed=6)
    # Add a class-dependent offset so the pooled probes have signal too.
    shift = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * 2
    x_tr = x_tr + shift[y_tr][:, :, None, None]
    x_te = x_te + shift[y_te][:, :, None, None]
    return FeatureCache(
        FeatureSet(x_tr.half(), y_tr), FeatureSet(x_te.half(), y_te), ["r", "g", "b"], 0.5
    )


@pytest.mark.parametrize("kinds", [["linear", "tran1", "knn"], ["knn", "linear"]])
def test_run_probes(cache, kinds):
    torch.manual_seed(0)
    cfg = ProbeConfig(
        kinds=kinds,
        epochs=5,
        batch_size=32,
        tran1_epochs=2,
        tran1_heads=2,
        warmup_epochs=1,
        knn_k=5,
    )
    metrics, heads = run_probes(cache, cfg)
    assert list(metrics) == kinds
    assert sorted(heads) == sorted(k for k in kinds if k != "knn")
    for m in metrics.values():
        assert 0.0 <= m["top1"] <= m["top5"] <= 100.0
        assert m["top5"] == pytest.approx(100.0)  # top-3 of 3 classes
        assert m["seconds"] >= 0.0
    assert metrics["knn"]["k"] == 5 and metrics["knn"]["top1"] >= 90.0
    assert metrics["linear"]["epochs"] == 5 and metrics["linear"]["top1"] >= 90.0
    assert math.isfinite(metrics["linear"]["final_train_loss"])
    assert isinstance(heads["linear"], LinearHead) and heads["linear"].fc.in_features == 16
    if "tran1" in kinds:
        assert metrics["tran1"]["epochs"] == 2
        tran1 = heads["tran1"]
        assert isinstance(tran1, Tran1Head)
        assert tran1.pos.shape == (1, 4, 16) and tran1.block.attn.num_heads == 2
        assert tran1.head.fc.out_features == 3
    # The returned head reproduces the reported accuracy.
    scores = predict(heads["linear"], cache.val.pooled)
    assert topk_accuracy(scores, cache.val.labels, 3)["top1"] == pytest.approx(
        metrics["linear"]["top1"]
    )


def test_metrics_markdown_row_per_probe():
    metrics = {
        "linear": {"top1": 71.234, "top5": 90.5, "seconds": 12.34, "epochs": 100},
        "tran1": {"top1": 75.0, "top5": 92.0, "seconds": 60.0},
        "knn": {"top1": 60.129, "top5": 80.0, "seconds": 1.0, "k": 20},
    }
    text = metrics_markdown(metrics, "resnet18 on synthetic")
    lines = text.splitlines()
    assert lines[0] == "### resnet18 on synthetic"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| probe |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["linear", "tran1", "knn"]
    assert "| linear | 71.23 | 90.50 | 12.3 |" in lines
    assert "| knn | 60.13 | 80.00 | 1.0 |" in lines
    assert text.endswith("\n")


def test_save_head_refuses_reserved_metadata(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_head(LinearHead(4, 2), tmp_path / "h.safetensors", ["a", "b"], kind="other")
