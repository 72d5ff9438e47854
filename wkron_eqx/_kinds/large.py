"""LARGE_PATH: 2-D leaves with a side longer than `max_size_dense`.

The long side gets a diagonal factor. If the other side is short, the leaf is cut
into strips of `block_size` along it and each strip gets a dense factor for that side;
all strips of a leaf share one stack, so their width is the short side rounded up to
`TILE_QUANTUM` when it is under `block_size` (a 50000x128 table gets 128x128 factors,
not 256x256) and `block_size` otherwise (the last strip is then zero-padded). If both
sides are long, both factors are diagonal and each layer is one entry.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._blocking import (
    cut_strips,
    join_strips,
    padded_identity,
    padded_ones,
    side_sizes,
    validity_mask,
)
from .._config import Config
from .._layout import LeafPlan
from .._noise import NoiseSource
from .._sharding import constrain_stack
from .._state import LeafState
from ._factors import Factors, StepContext, apply_stack, update_stack


def _valid_sides(plan: LeafPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rows, cols = plan.merged
    real = plan.strips
    if plan.diag_left and plan.diag_right:
        full = (rows,) * real, (cols,) * real
    elif plan.diag_left:
        full = (rows,) * real, side_sizes(plan.col_parts, plan.batch, real)
    else:
        full = side_sizes(plan.row_parts, plan.batch, real), (cols,) * real
    dummies = (0,) * (plan.stack - real)
    return full[0] + dummies, full[1] + dummies


def _factor(valid, side: int, diagonal: bool, config: Config) -> Array:
    dtype, scale = config.compute_dtype, config.preconditioner_init_scale
    return (padded_ones if diagonal else padded_identity)(valid, side, scale, dtype)


def init(plan: LeafPlan, config: Config) -> LeafState:
    """A diagonal factor of ones for each long side, padded identities for short ones."""
    rows, cols = plan.merged
    vr, vc = _valid_sides(plan)
    valid_rows, valid_cols = jnp.array(vr, jnp.int32), jnp.array(vc, jnp.int32)
    left_side = rows if plan.diag_left else plan.strip_side
    right_side = cols if plan.diag_right else plan.strip_side
    axis = config.pipeline_axis_name
    return LeafState(
        kind=int(plan.kind),
        scanned=int(plan.scanned),
        B=plan.batch,
        shape=plan.shape,
        merged=plan.merged,
        nr=sum(p.count for p in plan.row_parts) or 1,
        nc=sum(p.count for p in plan.col_parts) or 1,
        block_size=plan.block_size,
        diag_left=plan.diag_left,
        diag_right=plan.diag_right,
        stack=plan.stack,
        Ql=constrain_stack(_factor(valid_rows, left_side, plan.diag_left, config), axis),
        Qr=constrain_stack(_factor(valid_cols, right_side, plan.diag_right, config), axis),
        Ll=constrain_stack(jnp.zeros(plan.stack, jnp.float32), axis),
        Lr=constrain_stack(jnp.zeros(plan.stack, jnp.float32), axis),
        valid_rows=constrain_stack(valid_rows, axis),
        valid_cols=constrain_stack(valid_cols, axis),
    )


def update(
    ctx: StepContext,
    x: Float[Array, "B m n"],
    noise: NoiseSource | None,
    state: LeafState,
    plan: LeafPlan,
    refresh: bool,
    axis_name: str | None,
) -> tuple[Float[Array, "B m n"], LeafState]:
    """Precondition a large leaf; update its factors too when `refresh`."""
    strips = constrain_stack(cut_strips(x, plan).astype(ctx.product_dtype), axis_name)
    assert state.Ql is not None and state.Ll is not None
    assert state.valid_rows is not None and state.valid_cols is not None
    assert state.Qr is not None and state.Lr is not None
    factors = Factors(state.Ql, state.Qr, state.Ll, state.Lr)
    if refresh:
        noisy_strips = None
        if noise is not None:
            rows, cols = strips.shape[1:]
            valid = validity_mask(state.valid_rows, state.valid_cols, rows, cols)
            noisy_strips = noise.add(strips, valid, plan.strips)
        out, factors = update_stack(
            ctx, strips, noisy_strips, factors, state.valid_rows, state.valid_cols
        )
        Ql, Qr, Ll, Lr = (constrain_stack(f, axis_name) for f in factors)  # pyright: ignore
        state = state.replace(Ql=Ql, Qr=Qr, Ll=Ll, Lr=Lr)
    else:
        out = apply_stack(ctx.rule, strips, factors)
    return join_strips(out, plan), state
