"""Tests for heatssl.probing.probes: linear / tran-1 / kNN probes on synthetic cached features."""

from __future__ import annotations

import math

import pytest
import torch

from heatssl.config import ProbeConfig
from heatssl.errors import ArgumentError, ConfigError
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.probing.features import FeatureCache, FeatureSet
from heatssl.probing.probes import knn_scores, predict, run_probes, topk_accuracy, train_head
from tests.probing.synthetic import clusters, grids, train_linear

# ------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_clusters():
    torch.manual_seed(0)
    x_tr, y_tr = clusters(60, 4, 16, seed=1)
    x_te, y_te = clusters(100, 4, 16, seed=2)
    head = LinearHead(16, 4)
    history = train_head(head, x_tr, y_tr, 20, 64, "sgd", base_lr=1.0, warmup_epochs=1)
    assert len(history) == 20 and all(math.isfinite(v) for v in history)
    assert history[-1] < history[0]
    assert not head.training  # left in eval mode
    scores = predict(head, x_te, batch_size=70)  # several batches, the last partial
    assert scores.shape == (400, 4)
    acc = topk_accuracy(scores, y_te, 4)
    assert acc["top1"] >= 95.0  # (top-5 of 4 classes is 100 whatever the head: not a check)


def test_linear_probe_random_labels_is_chance_on_held_out():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    x_tr = torch.randn(256, 16, generator=gen)
    y_tr = torch.randint(0, 4, (256,), generator=gen)
    x_te = torch.randn(2000, 16, generator=gen)
    y_te = torch.randint(0, 4, (2000,), generator=gen)
    head = train_linear(x_tr, y_tr, 4, epochs=30)
    train_acc = topk_accuracy(predict(head, x_tr), y_tr, 4)["top1"]
    test_acc = topk_accuracy(predict(head, x_te), y_te, 4)["top1"]
    assert test_acc < 40.0
    assert train_acc > test_acc  # it did fit something, which does not transfer


def test_train_head_is_deterministic_given_seed():
    x, y = clusters(20, 3, 8, seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        head = train_linear(x, y, 3, epochs=3, seed=11)
        outs.append(predict(head, x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_unknown_optimizer_raises():
    x, y = clusters(4, 2, 4, seed=0)
    with pytest.raises(ArgumentError, match="optimizer='rmsprop'"):
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


# ----------------------------------------------------------------------------------------- tran-1


def test_tran1_learns_separable_grids():
    torch.manual_seed(0)
    x_tr, y_tr = grids(32, 4, 16, seed=1)
    x_te, y_te = grids(50, 4, 16, seed=2)
    head = Tran1Head(16, 4, tokens=4, heads=2)
    history = train_head(head, x_tr, y_tr, 3, 16, "adamw", base_lr=0.2, weight_decay=0.05)
    assert len(history) == 3 and history[-1] < history[0]
    assert not head.training
    scores = predict(head, x_te.half(), batch_size=64)  # float16 grids, as in the cache
    assert scores.shape == (200, 4) and scores.dtype == torch.float32
    assert topk_accuracy(scores, y_te, 4)["top1"] >= 90.0


# -------------------------------------------------------------------------------------- run_probes


@pytest.fixture(scope="module")
def cache() -> FeatureCache:
    x_tr, y_tr = grids(32, 3, 16, seed=5)
    x_te, y_te = grids(20, 3, 16, seed=6)
    # Add a class-dependent offset so the pooled probes have signal too.
    shift = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * 2
    x_tr = x_tr + shift[y_tr][:, :, None, None]
    x_te = x_te + shift[y_te][:, :, None, None]
    return FeatureCache(
        FeatureSet.from_grids(x_tr.half(), y_tr),
        FeatureSet.from_grids(x_te.half(), y_te),
        ["r", "g", "b"],
        0.5,
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
        assert 0.0 <= m["top1"] <= m["top5"] <= 100.0  # (top-5 of 3 classes is always 100)
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


def test_run_probes_names_the_config_key_of_a_bad_head_count(cache):
    cfg = ProbeConfig(kinds=["tran1"], tran1_epochs=1, tran1_heads=3)
    with pytest.raises(ConfigError, match=r"^probe\.tran1_heads=3 must divide"):
        run_probes(cache, cfg)


def test_knn_over_train_chunks_equals_one_pass():
    gen = torch.Generator().manual_seed(3)
    train, query = torch.randn(53, 6, generator=gen).half(), torch.randn(9, 6, generator=gen)
    labels = torch.randint(0, 4, (53,), generator=gen)
    whole = knn_scores(train, labels, query, 4, k=5, train_chunk=10**6)
    chunked = knn_scores(train, labels, query, 4, k=5, chunk=4, train_chunk=7)
    torch.testing.assert_close(chunked, whole)
