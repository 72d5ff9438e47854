"""The Kronecker step of one stack of entries, shared by the dense and large kinds.

An entry is a matrix `G` (`[rows, cols]`) with a left and a right factor, each dense
(`[side, side]`) or diagonal (`[side]`, for a side longer than `max_size_dense`). The
whole stack is handled by one `vmap`, so a bucket of dense tiles or a leaf's strips is
one batched computation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar

from .._rules import AbstractRule, track_lipschitz
from .._rules.norms import spectral_norm_lower_bound


class Factors(NamedTuple):
    """The factors of a stack and their Lipschitz estimates."""

    Ql: Float[Array, "stack *l"]
    Qr: Float[Array, "stack *r"]
    Ll: Float[Array, " stack"]
    Lr: Float[Array, " stack"]


class StepContext(NamedTuple):
    """What one update step knows beyond the entries."""

    rule: AbstractRule
    lr: Scalar  # the preconditioner step size, float32
    balance: Bool[Array, ""]  # whether this step rebalances each (Ql, Qr) pair
    product_dtype: jnp.dtype  # what the products run in (factors may be stored narrower)


def _left(Q: Array, X: Array, symmetric: bool) -> Array:
    """`Pl X` with `Pl = Q^T Q` (`q^2` for a diagonal factor).

    The order of the products is chosen from the static shapes: with `X` of `n x m`,
    `(Q^T Q) X` costs `n^3 + n^2 m` multiply-adds and `Q^T (Q X)` costs `2 n^2 m`, so a
    factor wider than `X` is applied twice instead of forming its gram.
    """
    if Q.ndim == 1:
        return (Q * Q)[:, None] * X
    Qt = Q if symmetric else Q.T
    n, m = X.shape
    return Qt @ (Q @ X) if m < n else (Qt @ Q) @ X


def _right(X: Array, Q: Array, symmetric: bool) -> Array:
    """`X Pr` with `Pr = Q^T Q` (`q^2` for a diagonal factor); see `_left`."""
    if Q.ndim == 1:
        return X * (Q * Q)[None, :]
    Qt = Q if symmetric else Q.T
    m, n = X.shape
    return (X @ Qt) @ Q if m < n else X @ (Qt @ Q)


def _apply(Ql: Array, Qr: Array, G: Array, symmetric: bool) -> Array:
    """`Pl G Pr` with `P = Q^T Q` (or `q^2` for a diagonal factor); `symmetric` says
    that each dense `Q` equals its transpose, so `Q^T` is `Q` itself.
    """
    return _right(_left(Ql, G, symmetric), Qr, symmetric)


def _norm_bound(A: Array) -> Scalar:
    if A.ndim == 1:
        return jnp.max(A).astype(jnp.float32) if A.size else jnp.zeros((), jnp.float32)
    return spectral_norm_lower_bound(A)


def _move(rule: AbstractRule, Q: Array, A: Array, c: Array, L: Array, lr: Scalar):
    """Track the Lipschitz constant and move one factor."""
    L = track_lipschitz(L, _norm_bound(A) + c)
    z = jnp.where(L > 0, rule.step_scale * lr / jnp.where(L > 0, L, 1), 0)
    z, c = z.astype(Q.dtype), c.astype(Q.dtype)
    Q = rule.diag(Q, A, c, z) if Q.ndim == 1 else rule.dense(Q, A, c, z)
    return Q, L


def _balance(Ql: Array, Qr: Array) -> tuple[Array, Array]:
    """Scale `Ql` and `Qr` to the same max-abs entry (the geometric mean of theirs)."""
    a = jnp.max(jnp.abs(Ql)).astype(jnp.float32)
    b = jnp.max(jnp.abs(Qr)).astype(jnp.float32)
    ok = (a > 0) & (b > 0)
    geo = jnp.sqrt(a * b)
    left = jnp.where(ok, geo / jnp.where(ok, a, 1), 1).astype(Ql.dtype)
    right = jnp.where(ok, geo / jnp.where(ok, b, 1), 1).astype(Qr.dtype)
    return Ql * left, Qr * right


def _balance_stack(balance: Bool[Array, ""], Ql: Array, Qr: Array) -> tuple[Array, Array]:
    # One `cond` for the whole stack: on the 99 steps in 100 that do not balance, the
    # factors go to the matmuls untouched instead of through a full-size multiply.
    return jax.lax.cond(balance, jax.vmap(_balance), lambda ql, qr: (ql, qr), Ql, Qr)


def _entry_step(ctx: StepContext, G, Gn, Ql, Qr, Ll, Lr, valid_rows, valid_cols):
    Pg = _apply(Ql, Qr, G if Gn is None else Gn, ctx.rule.symmetric)
    # c = numel / side: for the left factor that is the number of valid columns.
    c_left = jnp.where(valid_rows > 0, valid_cols, 0).astype(jnp.float32)
    c_right = jnp.where(valid_cols > 0, valid_rows, 0).astype(jnp.float32)
    A_left = jnp.sum(Pg * Pg, axis=1) if Ql.ndim == 1 else Pg @ Pg.T
    A_right = jnp.sum(Pg * Pg, axis=0) if Qr.ndim == 1 else Pg.T @ Pg
    Ql, Ll = _move(ctx.rule, Ql, A_left, c_left, Ll, ctx.lr)
    Qr, Lr = _move(ctx.rule, Qr, A_right, c_right, Lr, ctx.lr)
    return _apply(Ql, Qr, G, ctx.rule.symmetric), (Ql, Qr, Ll, Lr)


def update_stack(
    ctx: StepContext,
    G: Float[Array, "s r c"],
    Gn: Float[Array, "s r c"] | None,
    factors: Factors,
    valid_rows: Int[Array, " s"],
    valid_cols: Int[Array, " s"],
) -> tuple[Float[Array, "s r c"], Factors]:
    """Update every entry's factors from `Gn` (`G` plus noise; `None` for no noise),
    then precondition `G` with the new factors.

    The maths runs in `G`'s dtype; the new factors come back in the dtype they came in.

    **Returns:**

    `(Pl' G Pr', new factors)` for the whole stack.
    """
    Ql, Qr = (q.astype(G.dtype) for q in _balance_stack(ctx.balance, factors.Ql, factors.Qr))
    out, (Ql, Qr, Ll, Lr) = jax.vmap(
        lambda g, gn, ql, qr, ll, lr, vr, vc: _entry_step(ctx, g, gn, ql, qr, ll, lr, vr, vc)
    )(G, Gn, Ql, Qr, factors.Ll, factors.Lr, valid_rows, valid_cols)
    return out, Factors(Ql.astype(factors.Ql.dtype), Qr.astype(factors.Qr.dtype), Ll, Lr)


def apply_stack(
    rule: AbstractRule, G: Float[Array, "s r c"], factors: Factors
) -> Float[Array, "s r c"]:
    """Precondition with the current factors only (no noise, no factor update), in
    `G`'s dtype."""
    Ql, Qr = factors.Ql.astype(G.dtype), factors.Qr.astype(G.dtype)
    return jax.vmap(lambda ql, qr, g: _apply(ql, qr, g, rule.symmetric))(Ql, Qr, G)
