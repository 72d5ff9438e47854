"""DENSE_PATH: 2-D leaves with both sides <= `max_size_dense`.

Each leaf is cut into tiles of at most `block_size x block_size`; tiles of every dense
leaf with the same stored size share one `DenseState` bucket, so one `vmap` updates
them all. A tile's factors are sized to the tile (rounded up to `TILE_QUANTUM`), not to
`block_size`.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._blocking import pad_stack, padded_identity, tile, untile, validity_mask
from .._config import Config
from .._layout import Bucket, LeafPlan, TreePlan
from .._noise import NoiseSource
from .._sharding import constrain_stack
from .._state import DenseState, LeafState
from ._factors import Factors, StepContext, apply_stack, update_stack


def init(plan: LeafPlan, config: Config) -> LeafState:
    """The static description of a dense leaf (its factors live in the buckets)."""
    del config
    return LeafState(
        kind=int(plan.kind),
        scanned=int(plan.scanned),
        B=plan.batch,
        shape=plan.shape,
        merged=plan.merged,
        nr=sum(p.count for p in plan.row_parts),
        nc=sum(p.count for p in plan.col_parts),
        block_size=plan.block_size,
        diag_left=False,
        diag_right=False,
        stack=plan.strips,
    )


def _valid_sides(bucket: Bucket, leaves: tuple[LeafPlan, ...]) -> tuple[list[int], list[int]]:
    rows, cols = [], []
    for seg in bucket.segments:
        group = leaves[seg.leaf].groups[seg.group]
        rows += [group.row_part.size] * seg.count
        cols += [group.col_part.size] * seg.count
    dummies = bucket.stack - bucket.valid_count
    return rows + [0] * dummies, cols + [0] * dummies


def init_buckets(plan: TreePlan, config: Config) -> tuple[DenseState, ...]:
    """Padded identities (scaled by `preconditioner_init_scale`) for every bucket."""
    dtype, axis = config.compute_dtype, config.pipeline_axis_name
    states = []
    for bucket in plan.buckets:
        rows, cols = _valid_sides(bucket, plan.leaves)
        valid_rows, valid_cols = jnp.array(rows, jnp.int32), jnp.array(cols, jnp.int32)
        scale = config.preconditioner_init_scale
        states.append(
            DenseState(
                Ql=constrain_stack(padded_identity(valid_rows, bucket.rows, scale, dtype), axis),
                Qr=constrain_stack(padded_identity(valid_cols, bucket.cols, scale, dtype), axis),
                Ll=constrain_stack(jnp.zeros(bucket.stack, jnp.float32), axis),
                Lr=constrain_stack(jnp.zeros(bucket.stack, jnp.float32), axis),
                valid_rows=constrain_stack(valid_rows, axis),
                valid_cols=constrain_stack(valid_cols, axis),
                valid_count=bucket.valid_count,
                block_size=config.block_size,
            )
        )
    return tuple(states)


def _stack(tiles: dict[int, list[Array]], bucket: Bucket, axis_name: str | None) -> Array:
    stacked = jnp.concatenate([tiles[s.leaf][s.group] for s in bucket.segments], axis=0)
    return constrain_stack(pad_stack(stacked, bucket.stack), axis_name)


def update_buckets(
    ctx: StepContext,
    inputs: dict[int, Float[Array, "_ _ _"]],
    noise: NoiseSource | None,
    buckets: tuple[DenseState, ...],
    plan: TreePlan,
    refresh: bool,
    axis_name: str | None,
) -> tuple[dict[int, Float[Array, "_ _ _"]], tuple[DenseState, ...]]:
    """Precondition every dense leaf; update the factors too when `refresh`.

    **Arguments:**

    - `inputs`: leaf index -> the leaf viewed as `[B, m, n]`, for every dense leaf.
    - `noise`: where the factor update's noise comes from (`None`: no noise).
    - `buckets`: the current `DenseState`s, in `plan.buckets` order.

    **Returns:**

    `(outputs, new buckets)`, the outputs keyed like `inputs`.
    """
    tiles = {i: list(tile(x, plan.leaves[i])) for i, x in inputs.items()}
    new_buckets = []
    for bucket, state in zip(plan.buckets, buckets, strict=True):
        stacked = _stack(tiles, bucket, axis_name)
        factors = Factors(state.Ql, state.Qr, state.Ll, state.Lr)
        if refresh:
            stacked_noisy = None
            if noise is not None:
                valid = validity_mask(state.valid_rows, state.valid_cols, bucket.rows, bucket.cols)
                stacked_noisy = noise.add(stacked, valid, bucket.valid_count)
            out, factors = update_stack(
                ctx, stacked, stacked_noisy, factors, state.valid_rows, state.valid_cols
            )
            Ql, Qr, Ll, Lr = (constrain_stack(f, axis_name) for f in factors)
            state = state.replace(Ql=Ql, Qr=Qr, Ll=Ll, Lr=Lr)
        else:
            out = apply_stack(ctx.rule, stacked, factors)
        offset = 0
        for seg in bucket.segments:
            tiles[seg.leaf][seg.group] = out[offset : offset + seg.count]
            offset += seg.count
        new_buckets.append(state)
    outputs = {i: untile(tuple(tiles[i]), plan.leaves[i]) for i in inputs}
    return outputs, tuple(new_buckets)
