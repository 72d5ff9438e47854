"""The preconditioning of one stack of entries, shared by every leaf kind.

An entry is a matrix `G` (`[rows, cols]`) with a left factor and (except for 1-D
leaves) a right factor, each dense (`[side, side]`) or diagonal (`[side]`). The whole
stack is handled by one `vmap`, so a bucket of dense tiles or a leaf's strips is one
batched computation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar

from .._rules import AbstractRule, track_lipschitz
from .._rules.norms import spectral_norm_lower_bound


class Factors(NamedTuple):
    """The factors of a stack: `Qr`/`Lr` are `None` for 1-D leaves."""

    Ql: Float[Array, "stack *l"]
    Qr: Float[Array, "stack *r"] | None
    Ll: Float[Array, " stack"]
    Lr: Float[Array, " stack"] | None


class StepContext(NamedTuple):
    """What one update step knows beyond the entries."""

    rule: AbstractRule
    lr: Scalar  # the preconditioner step size, float32
    balance: Bool[Array, ""]  # whether this step rebalances each (Ql, Qr) pair


def _gram(Q: Array) -> Array:
    return Q * Q if Q.ndim == 1 else Q.T @ Q


def _left(P: Array, X: Array) -> Array:
    return P[:, None] * X if P.ndim == 1 else P @ X


def _right(X: Array, P: Array | None) -> Array:
    if P is None:
        return X
    return X * P[None, :] if P.ndim == 1 else X @ P


def _apply(Ql: Array, Qr: Array | None, G: Array) -> Array:
    return _right(_left(_gram(Ql), G), None if Qr is None else _gram(Qr))


def _norm_bound(A: Array) -> Scalar:
    if A.ndim == 1:
        return jnp.max(A).astype(jnp.float32) if A.size else jnp.zeros((), jnp.float32)
    return spectral_norm_lower_bound(A.astype(jnp.float32))


def _move(rule: AbstractRule, Q: Array, A: Array, c: Array, L: Array, lr: Scalar):
    """Track the Lipschitz constant and move one factor."""
    L = track_lipschitz(L, _norm_bound(A) + c)
    z = jnp.where(L > 0, rule.step_scale * lr / jnp.where(L > 0, L, 1), 0)
    z, c = z.astype(Q.dtype), c.astype(Q.dtype)
    Q = rule.diag(Q, A, c, z) if Q.ndim == 1 else rule.dense(Q, A, c, z)
    return Q, L


def _balance(Ql: Array, Qr: Array) -> tuple[Array, Array]:
    a = jnp.max(jnp.abs(Ql)).astype(jnp.float32)
    b = jnp.max(jnp.abs(Qr)).astype(jnp.float32)
    ok = (a > 0) & (b > 0)
    geo = jnp.sqrt(a * b)
    left = jnp.where(ok, geo / jnp.where(ok, a, 1), 1).astype(Ql.dtype)
    right = jnp.where(ok, geo / jnp.where(ok, b, 1), 1).astype(Qr.dtype)
    return Ql * left, Qr * right


def _entry_step(ctx: StepContext, G, Gn, Ql, Qr, Ll, Lr, valid_rows, valid_cols):
    if Qr is not None:
        Ql, Qr = jax.lax.cond(ctx.balance, _balance, lambda a, b: (a, b), Ql, Qr)
    Pg = _apply(Ql, Qr, G if Gn is None else Gn)
    # c = numel / side: for the left factor that is the number of valid columns.
    has_rows, has_cols = valid_rows > 0, valid_cols > 0
    c_left = jnp.where(has_rows, valid_cols, 0).astype(jnp.float32)
    c_right = jnp.where(has_cols, valid_rows, 0).astype(jnp.float32)
    A_left = jnp.sum(Pg * Pg, axis=1) if Ql.ndim == 1 else Pg @ Pg.T
    new_Ql, Ll = _move(ctx.rule, Ql, A_left, c_left, Ll, ctx.lr)
    if Qr is not None:
        A_right = jnp.sum(Pg * Pg, axis=0) if Qr.ndim == 1 else Pg.T @ Pg
        Qr, Lr = _move(ctx.rule, Qr, A_right, c_right, Lr, ctx.lr)
    return _apply(new_Ql, Qr, G), (new_Ql, Qr, Ll, Lr)


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

    **Returns:**

    `(Pl' G Pr', new factors)` for the whole stack.
    """
    out, new = jax.vmap(
        lambda g, gn, ql, qr, ll, lr, vr, vc: _entry_step(ctx, g, gn, ql, qr, ll, lr, vr, vc)
    )(G, Gn, *factors, valid_rows, valid_cols)
    return out, Factors(*new)


def apply_stack(G: Float[Array, "s r c"], factors: Factors) -> Float[Array, "s r c"]:
    """Precondition with the current factors only (no noise, no factor update)."""
    return jax.vmap(_apply)(factors.Ql, factors.Qr, G)
