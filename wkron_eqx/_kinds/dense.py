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
from .._layout import Bucket, ComputeGroup, GroupMember, LeafPlan, TreePlan
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


def _fit(x: Array, transposed: bool, rows: int, cols: int) -> Array:
    """A bucket's `[s, r, c]` stack (or `[s, c, r]` if `transposed`) zero-padded to the
    group's `[s, rows, cols]`."""
    if transposed:
        x = jnp.swapaxes(x, 1, 2)
    if x.shape[1:] == (rows, cols):
        return x
    return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])))


def _unfit(x: Array, transposed: bool, rows: int, cols: int) -> Array:
    """Undo `_fit` for a bucket whose stored stack is `[s, rows, cols]`."""
    if transposed:
        return jnp.swapaxes(x[:, :cols, :rows], 1, 2)
    return x[:, :rows, :cols]


def _oriented(member: GroupMember, left, right) -> tuple:
    """`(left, right)` as the group sees them: swapped for a transposed member."""
    return (right, left) if member.transposed else (left, right)


def _group_inputs(group: ComputeGroup, states: tuple[DenseState, ...], arrays) -> list:
    """Concatenate the members' `G`, `Gn`, factors and valid sides for one group, with
    the left and right roles swapped for transposed members."""
    parts = []
    for m in group.members:
        state = states[m.bucket]
        left, right = _oriented(
            m, (state.Ql, state.Ll, state.valid_rows), (state.Qr, state.Lr, state.valid_cols)
        )
        G, Gn = (None if x is None else _fit(x, m.transposed, group.rows, group.cols)
                 for x in arrays[m.bucket])  # fmt: skip
        Ql = _fit(left[0], False, group.rows, group.rows)
        Qr = _fit(right[0], False, group.cols, group.cols)
        parts.append((G, Gn, Ql, Qr, left[1], right[1], left[2], right[2]))
    join = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
    return [None if xs[0] is None else join(xs) for xs in zip(*parts, strict=True)]


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

    Buckets are stored right-sized; each compute group of `plan.groups` is one batched
    computation over its members, zero-padded to the group's size.

    **Arguments:**

    - `inputs`: leaf index -> the leaf viewed as `[B, m, n]`, for every dense leaf.
    - `noise`: where the factor update's noise comes from (`None`: no noise).
    - `buckets`: the current `DenseState`s, in `plan.buckets` order.

    **Returns:**

    `(outputs, new buckets)`, the outputs keyed like `inputs`.
    """
    tiles = {i: list(tile(x, plan.leaves[i])) for i, x in inputs.items()}
    arrays = []  # per bucket: (G, G + noise or None)
    for bucket, state in zip(plan.buckets, buckets, strict=True):
        stacked = _stack(tiles, bucket, axis_name).astype(ctx.product_dtype)
        noisy = None
        if refresh and noise is not None:
            # Noise per bucket, before any grouping: a tile's noise is the same
            # whichever group it is computed in.
            valid = validity_mask(state.valid_rows, state.valid_cols, bucket.rows, bucket.cols)
            noisy = noise.add(stacked, valid, bucket.valid_count)
        arrays.append((stacked, noisy))
    new_buckets = list(buckets)
    for group in plan.groups:
        G, Gn, Ql, Qr, Ll, Lr, valid_rows, valid_cols = _group_inputs(group, buckets, arrays)
        factors = Factors(*(constrain_stack(f, axis_name) for f in (Ql, Qr, Ll, Lr)))
        G = constrain_stack(G, axis_name)
        if refresh:
            out, factors = update_stack(ctx, G, Gn, factors, valid_rows, valid_cols)
        else:
            out = apply_stack(ctx.rule, G, factors)
        offset = 0
        for m in group.members:
            bucket, state = plan.buckets[m.bucket], buckets[m.bucket]
            part = slice(offset, offset + bucket.stack)
            offset += bucket.stack
            result = _unfit(out[part], m.transposed, bucket.rows, bucket.cols)
            start = 0
            for seg in bucket.segments:
                tiles[seg.leaf][seg.group] = result[start : start + seg.count]
                start += seg.count
            if refresh:
                left, right = _oriented(m, bucket.rows, bucket.cols)
                (Ql, Ll), (Qr, Lr) = _oriented(
                    m,
                    (_unfit(factors.Ql[part], False, left, left), factors.Ll[part]),
                    (_unfit(factors.Qr[part], False, right, right), factors.Lr[part]),
                )
                Ql, Qr, Ll, Lr = (constrain_stack(f, axis_name) for f in (Ql, Qr, Ll, Lr))
                new_buckets[m.bucket] = state.replace(Ql=Ql, Qr=Qr, Ll=Ll, Lr=Lr)
    outputs = {i: untile(tuple(tiles[i]), plan.leaves[i]) for i in inputs}
    return outputs, tuple(new_buckets)
