"""An independent NumPy (float64) re-derivation of `scale_by_quad` / `scale_by_skew`.

Written from the maths of one step only, without importing `wkron_eqx`, so that the
tests compare two derivations rather than one implementation with itself. Every tile,
strip or layer ("entry") gets factors of exactly its valid size: padding is inert, so
the padded factors of the package must agree with these on their valid part.

Deliberate choices, each as the package documents them:

- the preconditioner step size floors at `min(preconditioner_lr, 0.4)` (the reference
  floors at `0.4`, which would *raise* a small `preconditioner_lr`);
- the Lipschitz statistic uses the exact spectral norm `np.linalg.norm(A, 2)`, where the
  package uses a power-iteration lower bound; the tests pick gradients for which the two agree;
- the Procrustes step uses the exact `||R||_2`;
- no noise (`noise_scale=0` in the package).
"""

import dataclasses
import math

import numpy as np


CLIP_RMS = 1.1
ADAM_DIVISOR = 5.0


def merge_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1-D `(length,)` or 2-D `(rows, cols)` view of a layer's shape."""
    if len(shape) < 2:
        return (math.prod(shape),)
    if math.prod(shape) == max(shape):
        return (max(shape),)
    if len(shape) == 2:
        return tuple(shape)
    splits = [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]
    # `min` keeps the first of equally good splits.
    return min(splits, key=lambda s: max(s) / min(s))


def _ranges(length: int, block_size: int) -> list[slice]:
    return [slice(a, min(a + block_size, length)) for a in range(0, length, block_size)]


@dataclasses.dataclass
class Entry:
    """One tile / strip / layer: `G = X[layer][rows, cols]` with its own factors.

    A factor is an `[s, s]` matrix (dense) or an `[s]` vector (diagonal); `Qr is None`
    for 1-D leaves.
    """

    layer: int
    rows: slice
    cols: slice
    Ql: np.ndarray
    Qr: np.ndarray | None
    Ll: float = 0.0
    Lr: float = 0.0


@dataclasses.dataclass
class Leaf:
    shape: tuple[int, ...]  # the full shape, scanned axis included
    batch: int
    merged: tuple[int, ...]
    kind: str  # "dense" | "large" | "one_d"
    entries: list[Entry]
    mu: np.ndarray


def _identity(size: int, diagonal: bool, scale: float) -> np.ndarray:
    return np.full(size, scale) if diagonal else scale * np.eye(size)


def plan_leaf(
    shape: tuple[int, ...],
    scanned: bool,
    block_size: int,
    max_size_dense: int,
    scale: float,
    memory_save_mode: str | None = None,
) -> Leaf:
    """Classify a leaf and give every entry its initial factors."""
    batch, layer_shape = (shape[0], shape[1:]) if scanned else (1, shape)
    merged = merge_shape(tuple(layer_shape))
    entries = []
    if len(merged) == 1:
        kind = "one_d"
        for b in range(batch):
            entries.append(
                Entry(b, slice(0, merged[0]), slice(0, 1), np.full(merged[0], scale), None)
            )
    else:
        m, n = merged
        diag_left, diag_right = m > max_size_dense, n > max_size_dense
        if memory_save_mode == "all_diag" and m * n:
            diag_left = diag_right = True
        elif memory_save_mode == "one_diag" and m * n:
            # The longer side; the last (right) one of a square leaf.
            diag_left, diag_right = diag_left or m > n, diag_right or n >= m
        kind = "large" if (diag_left or diag_right) else "dense"
        row_ranges = [slice(0, m)] if diag_left else _ranges(m, block_size)
        col_ranges = [slice(0, n)] if diag_right else _ranges(n, block_size)
        for b in range(batch):
            for rows in row_ranges:
                for cols in col_ranges:
                    r, c = rows.stop - rows.start, cols.stop - cols.start
                    left = _identity(r, diag_left, scale)
                    right = _identity(c, diag_right, scale)
                    entries.append(Entry(b, rows, cols, left, right))
    return Leaf(tuple(shape), batch, merged, kind, entries, np.zeros(shape))


def _gram(Q: np.ndarray) -> np.ndarray:
    """`P = Q^T Q` (a diagonal factor gives the vector `q^2`)."""
    return Q * Q if Q.ndim == 1 else Q.T @ Q


def _left(P: np.ndarray, X: np.ndarray) -> np.ndarray:
    return P[:, None] * X if P.ndim == 1 else P @ X


def _right(X: np.ndarray, P: np.ndarray) -> np.ndarray:
    return X * P[None, :] if P.ndim == 1 else X @ P


def procrustes_step(Q: np.ndarray) -> np.ndarray:
    """Procrustes' rotation of `Q` toward a symmetric matrix (`R = Q^T - Q`, scaled by its
    largest entry, and an exact `||R||_2`), applied after each of its factor steps."""
    R = Q.T - Q
    size = np.max(np.abs(R))
    if size == 0:
        return Q
    R = R / size
    RQ = R @ Q
    tr_RQ = np.trace(RQ)
    if tr_RQ <= 0:
        return Q
    a = (1 / 8) / np.linalg.norm(R, 2)
    RRQ = R @ RQ
    tr_RRQ = np.trace(RRQ)
    if tr_RRQ < 0:
        a = min(a, -tr_RQ / tr_RRQ)
    return Q + a * (RQ + 0.5 * a * RRQ)


def move_factor(rule: str, Q: np.ndarray, A: np.ndarray, c: float, L: float, lr: float):
    """Lipschitz tracking (`L = max(0.95 L + 0.05 ell, ell)`, `ell` the norm of `A` plus
    `c`), then one QUAD or
    Procrustes step of one factor."""
    ell = (np.max(A) if Q.ndim == 1 else np.linalg.norm(A, 2)) + c
    L = max(0.95 * L + 0.05 * ell, ell)
    if rule == "quad":
        z = lr / (2 * L)
        if Q.ndim == 1:
            return Q * (1 - z * (A - c)) ** 2, L
        P = Q - z * (A @ Q - c * Q)
        P = P - z * (P @ A - c * P)
        return (P + P.T) / 2, L
    if rule == "skew":
        z = lr / L
        if Q.ndim == 1:
            return Q * (1 - z * (A - c)), L
        return procrustes_step(Q - z * (A @ Q - c * Q)), L
    raise ValueError(rule)


def balance(Ql: np.ndarray, Qr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give both factors the same max-abs, keeping their product (the balancing step)."""
    a, b = np.max(np.abs(Ql)), np.max(np.abs(Qr))
    geo = math.sqrt(a * b)
    return Ql * (geo / a), Qr * (geo / b)


def precondition_entry(entry: Entry, G: np.ndarray, rule: str, lr: float, rebalance: bool):
    """One entry's factor update from its gradient block `G` (the statistics `A`, then
    each factor's step), and the preconditioned `Pl' G Pr'` with the new factors."""
    if entry.Qr is None:  # 1-D: Pg = q^2 g, A = Pg^2, c = 1
        g = G[:, 0]
        Pg = entry.Ql**2 * g
        entry.Ql, entry.Ll = move_factor(rule, entry.Ql, Pg**2, 1.0, entry.Ll, lr)
        return (entry.Ql**2 * g)[:, None]
    if rebalance:
        entry.Ql, entry.Qr = balance(entry.Ql, entry.Qr)
    m, n = G.shape
    numel = m * n
    Pg = _right(_left(_gram(entry.Ql), G), _gram(entry.Qr))
    A_left = np.sum(Pg**2, axis=1) if entry.Ql.ndim == 1 else Pg @ Pg.T
    A_right = np.sum(Pg**2, axis=0) if entry.Qr.ndim == 1 else Pg.T @ Pg
    entry.Ql, entry.Ll = move_factor(rule, entry.Ql, A_left, numel / m, entry.Ll, lr)
    entry.Qr, entry.Lr = move_factor(rule, entry.Qr, A_right, numel / n, entry.Lr, lr)
    return _right(_left(_gram(entry.Ql), G), _gram(entry.Qr))


def _start_from(leaf: Leaf, layers: np.ndarray) -> None:
    """`preconditioner_init_scale=None` on the first step: every factor of a layer is
    multiplied by `(mean x^2)^(-1/(4k))` over the layer's input `x`, with `k` the number of
    factors of an entry (1 for a 1-D leaf, else 2), so that `P x` has unit RMS; a zero or
    non-finite statistic leaves the factors as they are. (The factors then take no step
    on that first step: see `step`.)"""
    k = 1 if leaf.kind == "one_d" else 2
    for entry in leaf.entries:
        mean_sq = np.mean(layers[entry.layer] ** 2) if layers[entry.layer].size else 0.0
        if not (np.isfinite(mean_sq) and mean_sq > 0):
            continue
        scale = mean_sq ** (-1 / (4 * k))
        entry.Ql = entry.Ql * scale
        if entry.Qr is not None:
            entry.Qr = entry.Qr * scale


class ReferenceOptimizer:
    """A stateful float64 twin of `scale_by_quad` (`rule="quad"`) / `scale_by_skew`
    (`rule="skew"`) with `noise_scale=0`.

    **Arguments:**

    - `shapes`: the params' leaf shapes; `scanned`: one flag per leaf.
    - the rest: the package's hyperparameters of the same names.
    """

    def __init__(
        self,
        rule: str,
        shapes: list[tuple[int, ...]],
        scanned: list[bool] | None = None,
        *,
        lr_style: str | None = "adam",
        b1: float = 0.95,
        normalize_grads: bool = False,
        max_size_dense: int = 16384,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float | None = 1.0,
        block_size: int = 256,
        memory_save_mode: str | None = None,
        count: int = 0,
    ):
        self.rule, self.lr_style, self.b1 = rule, lr_style, b1
        self.normalize_grads, self.preconditioner_lr = normalize_grads, preconditioner_lr
        self.count = count
        self.from_input = preconditioner_init_scale is None
        scanned = scanned or [False] * len(shapes)
        scale = 1.0 if preconditioner_init_scale is None else preconditioner_init_scale
        self.leaves = [
            plan_leaf(tuple(s), f, block_size, max_size_dense, scale, memory_save_mode)
            for s, f in zip(shapes, scanned, strict=True)
        ]

    def step(self, grads: list[np.ndarray]) -> list[np.ndarray]:
        """One update (momentum, factors, output, clip, lr style); returns one update
        per leaf."""
        t = self.count + 1
        self.count = t
        lr = self.preconditioner_lr
        lr_p = max(lr / math.sqrt(1 + t / 10000), min(lr, 0.4))
        rebalance = t % 100 == 0
        updates = []
        for leaf, g in zip(self.leaves, grads, strict=True):
            g = np.asarray(g, np.float64)
            if self.b1 > 0:
                leaf.mu = self.b1 * leaf.mu + (1 - self.b1) * g
                x = leaf.mu / (1 - self.b1**t)
            else:
                x = g
            if self.normalize_grads:
                x = x / (np.linalg.norm(x) + 1e-6)
            layers = x.reshape((leaf.batch,) + leaf.merged)
            step_lr = lr_p
            if self.from_input and t == 1:
                _start_from(leaf, layers)
                step_lr = 0.0  # the first step only sets the scale
            if leaf.kind == "one_d":
                layers = layers[..., None]
            out = np.zeros_like(layers)
            for entry in leaf.entries:
                G = layers[entry.layer, entry.rows, entry.cols]
                out[entry.layer, entry.rows, entry.cols] = precondition_entry(
                    entry, G, self.rule, step_lr, rebalance
                )
            u = out.reshape(leaf.shape)
            if u.size:
                u = u * CLIP_RMS / max(math.sqrt(np.mean(u**2)), CLIP_RMS)
            if self.lr_style == "adam":
                u = u / ADAM_DIVISOR
            updates.append(u)
        return updates
