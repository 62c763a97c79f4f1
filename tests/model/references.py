"""Plain-loop references of the heat extrapolation and the heat loss: one cell and one step at a time,
written from the equations (docs/method.md), to check the vectorised modules against."""

from __future__ import annotations

import math

import torch

from heatssl.model.heat import HeatPredictor

STEPS = ["euler", "normalized"]


def _vec(t, n, y, x):
    """Feature vector at (n, :, y, x) as a list of Python floats."""
    return [float(t[n, c, y, x]) for c in range(t.shape[1])]


def _f(v, step, scale=1.0):
    """The step rule's input: the vector itself (euler) or its standardisation over channels
    times the image's feature scale (normalized)."""
    if step == "euler":
        return list(v)
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [scale * (a - mean) / math.sqrt(var + 1e-5) for a in v]


def _scale(t, n, eps=1e-8):
    """Sample ``n``'s feature scale: RMS over channels and cells of the map centred per channel."""
    _, d, h, w = t.shape
    total = 0.0
    for c in range(d):
        vals = [float(t[n, c, y, x]) for y in range(h) for x in range(w)]
        mean = sum(vals) / len(vals)
        total += sum((a - mean) ** 2 for a in vals)
    return math.sqrt(total / (d * h * w) + eps)


def _rows(m):
    """A matrix as nested lists of Python floats (independent of torch from here on)."""
    return [[float(e) for e in row] for row in m.detach().tolist()]


def _matvec(m, v):
    d = len(v)
    return [sum(m[i][j] * v[j] for j in range(d)) for i in range(d)]


def _step(v, m, sign, step, scale=1.0):
    mv = _matvec(m, _f(v, step, scale))
    return [v[i] + sign * mv[i] for i in range(len(v))]


def reference_predict(block, quadrants, a, b, step):
    """Extrapolate each sample cell by cell: first along x over the kept rows, then along y."""
    n_batch, d, h, w = block.shape
    a, b = _rows(a), _rows(b)
    out = torch.zeros(n_batch, d, 2 * h, 2 * w, dtype=torch.float64)
    grid = {}
    for n in range(n_batch):
        q = int(quadrants[n])
        right, bottom = q in (1, 3), q in (2, 3)
        x0, y0 = (w if right else 0), (h if bottom else 0)
        s = _scale(block, n)
        grid.clear()
        for i in range(h):
            for j in range(w):
                grid[(y0 + i, x0 + j)] = _vec(block, n, i, j)
        # along x, across the kept rows, moving away from the block
        for y in range(y0, y0 + h):
            if right:
                for x in range(w - 1, -1, -1):
                    grid[(y, x)] = _step(grid[(y, x + 1)], a, -1.0, step, s)
            else:
                for x in range(w, 2 * w):
                    grid[(y, x)] = _step(grid[(y, x - 1)], a, 1.0, step, s)
        # then along y, over the full width
        for x in range(2 * w):
            if bottom:
                for y in range(h - 1, -1, -1):
                    grid[(y, x)] = _step(grid[(y + 1, x)], b, -1.0, step, s)
            else:
                for y in range(h, 2 * h):
                    grid[(y, x)] = _step(grid[(y - 1, x)], b, 1.0, step, s)
        for (y, x), v in grid.items():
            for c in range(d):
                out[n, c, y, x] = v[c]
    return out


def reference_heat_loss(z, a, b, step, eps=1e-8):
    """Scale-free residual loss with explicit loops over samples, cells and channels.

    The denominator's ``||z||^2`` is of each map centred per channel over its cells."""
    n_batch, d, h, w = z.shape
    a, b = _rows(a), _rows(b)

    def sq(v):
        return sum(t * t for t in v)

    rx = dx = ry = dy = zz = 0.0
    for n in range(n_batch):
        s = _scale(z, n)
        mean = [
            sum(float(z[n, c, y, x]) for y in range(h) for x in range(w)) / (h * w)
            for c in range(d)
        ]
        for y in range(h):
            for x in range(w):
                v = _vec(z, n, y, x)
                zz += sq([p - q for p, q in zip(v, mean, strict=True)])
                if x + 1 < w:
                    diff = [p - q for p, q in zip(_vec(z, n, y, x + 1), v, strict=True)]
                    pred = _matvec(a, _f(v, step, s))
                    dx += sq(diff)
                    rx += sq([p - q for p, q in zip(diff, pred, strict=True)])
                if y + 1 < h:
                    diff = [p - q for p, q in zip(_vec(z, n, y + 1, x), v, strict=True)]
                    pred = _matvec(b, _f(v, step, s))
                    dy += sq(diff)
                    ry += sq([p - q for p, q in zip(diff, pred, strict=True)])
    n_x, n_y, n_z = n_batch * h * (w - 1), n_batch * (h - 1) * w, n_batch * h * w
    return (rx / n_x + ry / n_y + eps) / (dx / n_x + dy / n_y + zz / n_z + eps)


def _predictor(step, d=3, seed=0, scale=0.3):
    torch.manual_seed(seed)
    predictor = HeatPredictor(d, step=step).double()
    predictor.operators.A.data = torch.randn(d, d, dtype=torch.float64) * scale
    predictor.operators.B.data = torch.randn(d, d, dtype=torch.float64) * scale
    return predictor


def _commuting_pair(d, seed=0):
    """A random A and B = 0.5 A + 0.3 A^2 - 0.1 I (a polynomial in A, so AB = BA)."""
    torch.manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64) * (0.2 / math.sqrt(d))
    b = 0.5 * a + 0.3 * a @ a - 0.1 * torch.eye(d, dtype=torch.float64)
    return a, b
