"""What one Kronecker step does to one stack of entries.

An entry is a matrix `G` (`[rows, cols]`) with a left and a right factor, each dense
(`[side, side]`) or diagonal (`[side]`, for a side longer than `max_size_dense`). A
stack (a bucket of dense tiles, a compute group, a large leaf's strips) is handled by
one `vmap`, so it is one batched computation. The step, per entry:

1. `Pg = Pl Gn Pr` with `P = Q^T Q` and `Gn` the noisy `G`;
2. the statistics `A = Pg Pg^T` (left) and `Pg^T Pg` (right), with `c = numel / side`;
3. the Lipschitz estimate `L <- max(0.95 L + 0.05 l, l)`, `l = ||A||_2 + c`;
4. each factor moved by the rule with step `z = step_scale * lr / L`;
5. the output `Pl' G Pr'` with the new factors.

Everything is straight-line code: no `while`, `scan` or `cond`, which on an accelerator
would each cost a round trip to the host.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Scalar

from ._noise import LEFT_STREAM, RIGHT_STREAM, stochastic_round
from ._norms import spectral_norm_lower_bound, track_lipschitz
from ._rules import AbstractRule


class Factors(NamedTuple):
    """The factors of a stack and their Lipschitz estimates."""

    Ql: Float[Array, "stack *l"]
    Qr: Float[Array, "stack *r"]
    Ll: Float[Array, " stack"]
    Lr: Float[Array, " stack"]


class StackCache(NamedTuple):
    """A stack's stored preconditioner sides, `Pl = Ql^T Ql` and `Pr = Qr^T Qr` (`q^2`
    for a diagonal factor), for steps that only apply (`cache_preconditioner`)."""

    Pl: Float[Array, "stack *l"]
    Pr: Float[Array, "stack *r"]


class StepContext(NamedTuple):
    """What one update step knows beyond the entries."""

    rule: AbstractRule
    lr: Scalar  # the preconditioner step size, float32
    balance: Bool[Array, ""]  # whether this step rebalances each (Ql, Qr) pair
    product_dtype: jnp.dtype  # what the products run in (factors may be stored narrower)
    input_scale: Scalar  # multiplies every input: the momentum's bias correction, float32
    step: Int[Array, ""]  # t = count + 1, the key of this step's noise
    noise_scale: float
    # Whether the factors start from this step's input (`preconditioner_init_scale=None`
    # and the first step); `None` when they start from a given scale.
    first: Bool[Array, ""] | None = None
    stochastic_rounding: bool = False  # round the stored factors stochastically
    # The power iterations as loops (`Backend.loops_are_cheap`); the rule has its own.
    loops_are_cheap: bool = True

    def corrected(self, x: Array) -> Array:
        """`x` with the momentum's bias correction applied (`bias_corrected`)."""
        return bias_corrected(x, self.input_scale)


def bias_corrected(x: Array, input_scale: Scalar) -> Array:
    """`x / (1 - b1^t)`, as `x * input_scale` in `x`'s dtype.

    The correction is one scalar for the whole tree, so it is applied where the kinds
    stack their inputs (`StepContext.corrected`) and fuses into that copy: no pass, and
    no kernel, of its own per leaf.
    """
    return x * input_scale.astype(x.dtype)


def store(ctx: StepContext, x: Array, dtype, stream: int) -> Array:
    """`x` in its storage `dtype`: rounded stochastically with `ctx.stochastic_rounding`
    (`stream` tells the arrays of one step apart), else a plain cast."""
    if ctx.stochastic_rounding:
        return stochastic_round(x, dtype, ctx.step, stream)
    return x.astype(dtype)


# How `preconditioner_init_scale=None` starts: the product of the sides scaled by the
# inverse RMS of the first input, all the way to unit RMS, and no factor step on that
# first step. Measured against starting from `(mean G^4)^(1/4)`, going half way (in log
# scale), and taking the first factor step at once: this start gave a first update at
# the steady size and the lowest loss at step 50 (`benchmarks/results/init_scale.md`).
def initial_scales(
    sums: Float[Array, " n"], size: ArrayLike, first: Bool[Array, ""], factors: int
) -> Float[Array, " n"]:
    """The factor by which each of an entry's `factors` factors is multiplied on the first
    step, so that `P G` comes out at unit RMS: the product of the sides `P = Q^T Q` is
    scaled by `1 / RMS(G)`, split evenly between the factors.

    **Arguments:**

    - `sums`: per entry (a leaf's layer), the sum of `G^2` over its elements
      (`sum_powers`).
    - `size`: per entry, its number of elements.
    - `first`: whether this is the first step; otherwise every scale is 1.
    - `factors`: 1 for a 1-D leaf (one factor), 2 for a matrix.

    **Returns:**

    The scales, float32; 1 where `first` is false or the statistic is zero or not finite
    (a zero first gradient, or one whose powers underflow float32).
    """
    mean = sums.astype(jnp.float32) / jnp.asarray(size, jnp.float32)
    usable = first & (mean > 0) & jnp.isfinite(mean)
    # Each of `factors` factors takes `RMS^(-1 / (2 factors))`: `P` is quadratic in `Q`.
    scale = jnp.where(usable, mean, 1.0) ** (-1 / (4 * factors))
    return jnp.where(usable & jnp.isfinite(scale), scale, 1.0)


def powers(x: Array) -> Array:
    """`x^2` in float32, elementwise: what `initial_scales` sums."""
    return jnp.square(x.astype(jnp.float32))


def sum_powers(G: Float[Array, "s r c"]) -> Float[Array, " s"]:
    """Per entry of a stack, the float32 sum of `G^2` (padding and dummies add 0)."""
    return jnp.sum(powers(G), axis=(1, 2))


def rescaled(factors: "Factors", scales: Float[Array, " s"]) -> "Factors":
    """Both factors of every entry multiplied by the entry's scale."""
    return factors._replace(Ql=_scaled(factors.Ql, scales), Qr=_scaled(factors.Qr, scales))


def gram(Q: Array, symmetric: bool) -> Array:
    """`Q^T Q` of one factor (`q^2` for a diagonal one)."""
    if Q.ndim == 1:
        return Q * Q
    return (Q if symmetric else Q.T) @ Q


def _times_left(P: Array, X: Array) -> Array:
    """`P X` for a side `P` (a vector: a diagonal one)."""
    return P[:, None] * X if P.ndim == 1 else P @ X


def _times_right(X: Array, P: Array) -> Array:
    """`X P` for a side `P` (a vector: a diagonal one)."""
    return X * P[None, :] if P.ndim == 1 else X @ P


def _left(Q: Array, X: Array, symmetric: bool) -> Array:
    """`Pl X` with `Pl = Q^T Q` (`q^2` for a diagonal factor).

    The order of the products is chosen from the static shapes: with `X` of `n x m`,
    `(Q^T Q) X` costs `n^3 + n^2 m` multiply-adds and `Q^T (Q X)` costs `2 n^2 m`, so a
    factor wider than `X` is applied twice instead of forming its gram.
    """
    n, m = X.shape
    if Q.ndim == 2 and m < n:
        return (Q if symmetric else Q.T) @ (Q @ X)
    return _times_left(gram(Q, symmetric), X)


def _right(X: Array, Q: Array, symmetric: bool) -> Array:
    """`X Pr` with `Pr = Q^T Q` (`q^2` for a diagonal factor); see `_left`."""
    m, n = X.shape
    if Q.ndim == 2 and m < n:
        return (X @ (Q if symmetric else Q.T)) @ Q
    return _times_right(X, gram(Q, symmetric))


def _apply_grams(Pl: Array, Pr: Array, G: Array) -> Array:
    """`Pl G Pr` from the sides themselves: one product per dense side."""
    return _times_right(_times_left(Pl, G), Pr)


def _apply(Ql: Array, Qr: Array, G: Array, symmetric: bool) -> Array:
    """`Pl G Pr` with `P = Q^T Q` (or `q^2` for a diagonal factor); `symmetric` says
    that each dense `Q` equals its transpose, so `Q^T` is `Q` itself."""
    return _right(_left(Ql, G, symmetric), Qr, symmetric)


def _norm_bound(A: Array, loop: bool) -> Scalar:
    if A.ndim == 1:
        return jnp.max(A).astype(jnp.float32) if A.size else jnp.zeros((), jnp.float32)
    return spectral_norm_lower_bound(A, loop=loop)


def step_size(rule: AbstractRule, L: Array, lr: Scalar) -> Array:
    """A factor's step `z = step_scale * lr / L` from its Lipschitz estimate(s) `L`
    (0 where `L` is 0: a factor that has seen nothing does not move)."""
    return jnp.where(L > 0, rule.step_scale * lr / jnp.where(L > 0, L, 1), 0)


def _move(ctx: StepContext, Q: Array, A: Array, c: Array, L: Array):
    """Track the Lipschitz constant and move one factor."""
    L = track_lipschitz(L, _norm_bound(A, ctx.loops_are_cheap) + c)
    z, c = step_size(ctx.rule, L, ctx.lr).astype(Q.dtype), c.astype(Q.dtype)
    Q = ctx.rule.diag(Q, A, c, z) if Q.ndim == 1 else ctx.rule.dense(Q, A, c, z)
    return Q, L


def balance_scales(balance: Bool[Array, ""], Ql: Array, Qr: Array) -> tuple[Array, Array]:
    """Per-entry scalars that bring `Ql` and `Qr` to the same max-abs entry (the
    geometric mean of theirs) when `balance`, and 1 otherwise.

    Their product is 1, so `Pl G Pr` is unchanged, and both rules are homogeneous of
    degree one in `Q`: scaling the updated factors equals updating scaled ones. So the
    scales are applied to the new factors, in the kernel that writes them, instead of
    a separate pass (or a `cond`) over the old ones.
    """
    axes = tuple(range(1, Ql.ndim))
    a = jnp.max(jnp.abs(Ql), axis=axes).astype(jnp.float32)
    b = jnp.max(jnp.abs(Qr), axis=tuple(range(1, Qr.ndim))).astype(jnp.float32)
    ok = balance & (a > 0) & (b > 0)
    geo = jnp.sqrt(a * b)
    left = jnp.where(ok, geo / jnp.where(ok, a, 1), 1)
    right = jnp.where(ok, geo / jnp.where(ok, b, 1), 1)
    return left, right


def _scaled(Q: Array, s: Array) -> Array:
    return Q * s.reshape(s.shape + (1,) * (Q.ndim - 1)).astype(Q.dtype)


def _entry_step(ctx: StepContext, cache: bool, G, Gn, Ql, Qr, Ll, Lr, valid_rows, valid_cols):
    Pg = _apply(Ql, Qr, Gn, ctx.rule.symmetric)
    # c = numel / side: for the left factor that is the number of valid columns.
    c_left = jnp.where(valid_rows > 0, valid_cols, 0).astype(jnp.float32)
    c_right = jnp.where(valid_cols > 0, valid_rows, 0).astype(jnp.float32)
    A_left = jnp.sum(Pg * Pg, axis=1) if Ql.ndim == 1 else Pg @ Pg.T
    A_right = jnp.sum(Pg * Pg, axis=0) if Qr.ndim == 1 else Pg.T @ Pg
    Ql, Ll = _move(ctx, Ql, A_left, c_left, Ll)
    Qr, Lr = _move(ctx, Qr, A_right, c_right, Lr)
    if not cache:
        return _apply(Ql, Qr, G, ctx.rule.symmetric), (Ql, Qr, Ll, Lr), None
    # The output from the sides that are stored anyway: for a tile no wider than its
    # factors, the same products `_apply` would do.
    Pl, Pr = gram(Ql, ctx.rule.symmetric), gram(Qr, ctx.rule.symmetric)
    return _apply_grams(Pl, Pr, G), (Ql, Qr, Ll, Lr), (Pl, Pr)


def update_stack(
    ctx: StepContext,
    G: Float[Array, "s r c"],
    Gn: Float[Array, "s r c"],
    factors: Factors,
    valid_rows: Int[Array, " s"],
    valid_cols: Int[Array, " s"],
    cache: bool = False,
) -> tuple[Float[Array, "s r c"], Factors, StackCache | None]:
    """Update every entry's factors from `Gn` (`G` plus noise, or `G` itself), then
    precondition `G` with the new factors.

    The maths runs in `G`'s dtype; the new factors (and sides) come back in the dtype
    the factors came in.

    **Returns:**

    `(Pl' G Pr', new factors, new sides)` for the whole stack; the sides `Pl' = Ql'^T
    Ql'` and `Pr'` only with `cache` (else `None`).
    """
    left, right = balance_scales(ctx.balance, factors.Ql, factors.Qr)
    Ql, Qr = factors.Ql.astype(G.dtype), factors.Qr.astype(G.dtype)
    out, (Ql, Qr, Ll, Lr), computed = jax.vmap(
        lambda g, gn, ql, qr, ll, lr, vr, vc: _entry_step(ctx, cache, g, gn, ql, qr, ll, lr, vr, vc)
    )(G, Gn, Ql, Qr, factors.Ll, factors.Lr, valid_rows, valid_cols)
    dtype = factors.Ql.dtype
    Ql = store(ctx, _scaled(Ql, left), dtype, stream=LEFT_STREAM)
    Qr = store(ctx, _scaled(Qr, right), factors.Qr.dtype, stream=RIGHT_STREAM)
    cached = None
    if computed is not None:
        # The balance multiplies each Q by a scalar, so its side by the square. A side is
        # recomputed at every update, not accumulated: rounded to nearest, it has no bias
        # to keep.
        Pl = _scaled(computed[0], left * left).astype(dtype)
        cached = StackCache(Pl, _scaled(computed[1], right * right).astype(factors.Qr.dtype))
    return out, Factors(Ql, Qr, Ll, Lr), cached


def initial_sides(factors: Factors, symmetric: bool, dtype) -> StackCache:
    """The sides of freshly initialised factors, in `dtype` (the factors' storage)."""
    side = lambda Q: jax.vmap(lambda q: gram(q.astype(jnp.float32), symmetric))(Q).astype(dtype)
    return StackCache(side(factors.Ql), side(factors.Qr))


def apply_stack(
    rule: AbstractRule, G: Float[Array, "s r c"], factors: Factors, sides: StackCache | None = None
) -> Float[Array, "s r c"]:
    """Precondition with the current factors only (no noise, no factor update), in
    `G`'s dtype: from the stored `sides` when given."""
    if sides is not None:
        Pl, Pr = sides.Pl.astype(G.dtype), sides.Pr.astype(G.dtype)
        return jax.vmap(_apply_grams)(Pl, Pr, G)
    Ql, Qr = factors.Ql.astype(G.dtype), factors.Qr.astype(G.dtype)
    return jax.vmap(lambda ql, qr, g: _apply(ql, qr, g, rule.symmetric))(Ql, Qr, G)
