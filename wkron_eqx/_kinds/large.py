"""LARGE_PATH: 2-D leaves with a side longer than `max_size_dense`.

The long side gets a diagonal factor. If the other side is short, the leaf is cut
into strips of `block_size` along it and each strip gets a dense factor for that side;
all strips of a leaf share one stack, so their width is the short side rounded up to
`TILE_QUANTUM` when it is under `block_size` (a 50000x128 table gets 128x128 factors,
not 256x256) and `block_size` otherwise (the last strip is then zero-padded). If both
sides are long, both factors are diagonal and each layer is one entry.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._blocking import (
    cut_strips,
    join_strips,
    padded_identity,
    padded_ones,
    per_shard,
    side_sizes,
    validity_mask,
)
from .._config import Config
from .._custom_types import AxisNames
from .._kron import (
    Factors,
    StackCache,
    StepContext,
    apply_stack,
    initial_scales,
    initial_sides,
    rescaled,
    sum_powers,
    update_stack,
)
from .._layout import LargeLayout, LeafKind, LeafPlan, TreePlan
from .._noise import add_noise
from .._sharding import constrain_stack
from .._state import LeafState
from ._base import AbstractLeafKind


State = tuple[LeafState, ...]  # one per large leaf, in leaf order
Cache = tuple[StackCache, ...]  # each large leaf's stored sides (`cache_preconditioner`)


def _valid_sides(plan: LeafPlan[LargeLayout]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rows, cols = plan.merged
    layout = plan.layout
    real = layout.strips
    if layout.diag_left and layout.diag_right:
        full = (rows,) * real, (cols,) * real
    elif layout.diag_left:
        full = (rows,) * real, side_sizes(layout.col_parts, plan.batch, real)
    else:
        full = side_sizes(layout.row_parts, plan.batch, real), (cols,) * real
    dummies = (0,) * (layout.stack - real)
    return (full[0] + dummies) * plan.shards, (full[1] + dummies) * plan.shards


def _strip_layers(plan: LeafPlan[LargeLayout]) -> np.ndarray:
    """The layer of the whole leaf each entry of the leaf's stack belongs to
    (`plan.layers` for a pipeline dummy): in each shard's run, strips are cut part by
    part, layer-major within a part (`cut_strips`)."""
    layout = plan.layout
    runs = []
    for layers in plan.view_layers().reshape(plan.shards, plan.batch):
        if layout.diag_left and layout.diag_right:
            run = layers
        else:
            parts = layout.col_parts if layout.diag_left else layout.row_parts
            run = np.concatenate(
                [np.zeros(0, np.int64)] + [np.repeat(layers, p.count) for p in parts]
            )
        runs += [run, np.full(layout.stack - len(run), plan.layers)]
    return np.concatenate(runs).astype(np.int32)


def stack_names(plan: LeafPlan, axis_name: AxisNames) -> AxisNames:
    """The mesh axes a leaf's stack is sharded over: its shards' (and their spread's)
    for a leaf planned by shard, else `axis_name`."""
    return axis_name if plan.grid is None else plan.grid.stack_axes


def _factor(valid, side: int, diagonal: bool, config: Config) -> Array:
    dtype, scale = config.compute_dtype, config.initial_scale
    return (padded_ones if diagonal else padded_identity)(valid, side, scale, dtype)


def _init_leaf(plan: LeafPlan[LargeLayout], config: Config) -> LeafState:
    """A diagonal factor of ones for each long side, padded identities for short ones."""
    rows, cols = plan.merged
    layout = plan.layout
    vr, vc = _valid_sides(plan)
    valid_rows, valid_cols = jnp.array(vr, jnp.int32), jnp.array(vc, jnp.int32)
    left_side = rows if layout.diag_left else layout.strip_side
    right_side = cols if layout.diag_right else layout.strip_side
    return LeafState.from_plan(
        plan,
        Ql=_factor(valid_rows, left_side, layout.diag_left, config),
        Qr=_factor(valid_cols, right_side, layout.diag_right, config),
        Ll=jnp.zeros(plan.shards * layout.stack, jnp.float32),
        Lr=jnp.zeros(plan.shards * layout.stack, jnp.float32),
        valid_rows=valid_rows,
        valid_cols=valid_cols,
    )


def _factors(state: LeafState) -> Factors:
    assert state.Ql is not None and state.Qr is not None
    assert state.Ll is not None and state.Lr is not None
    return Factors(state.Ql, state.Qr, state.Ll, state.Lr)


def _update_leaf(
    ctx: StepContext,
    x: Float[Array, "B m n"],
    state: LeafState,
    sides: StackCache | None,
    plan: LeafPlan[LargeLayout],
    refresh: bool,
    axis_name: AxisNames,
) -> tuple[Float[Array, "B m n"], LeafState, StackCache | None]:
    strips = per_shard(lambda y: cut_strips(y, plan), plan.shards)(x).astype(ctx.product_dtype)
    strips = constrain_stack(ctx.corrected(strips), stack_names(plan, axis_name))
    join = per_shard(lambda y: join_strips(y, plan), plan.shards)
    assert state.valid_rows is not None and state.valid_cols is not None
    factors = _factors(state)
    if not refresh:
        return join(apply_stack(ctx.rule, strips, factors, sides)), state, sides
    if ctx.first is not None:
        # Each layer's factors from its first input (`initial_scales`).
        layers = _strip_layers(plan)
        sums = jax.ops.segment_sum(sum_powers(strips), layers, plan.layers + 1)
        size = np.append(np.full(plan.layers, max(plan.layer_size, 1)), 1)
        scales = initial_scales(sums, size, ctx.first, factors=2)[layers]
        factors = rescaled(factors, scales)
    rows, cols = strips.shape[1:]
    valid = validity_mask(state.valid_rows, state.valid_cols, rows, cols)
    noisy = add_noise(strips, ctx.step, ctx.noise_scale, valid)
    out, factors, sides = update_stack(
        ctx, strips, noisy, factors, state.valid_rows, state.valid_cols, cache=sides is not None
    )
    Ql, Qr, Ll, Lr = factors
    return join(out), state.replace(Ql=Ql, Qr=Qr, Ll=Ll, Lr=Lr), sides


class LargeKind(AbstractLeafKind):
    """`LARGE_PATH`: a `LeafState` (and its sides) per large leaf
    (`WhiteKronState.large`)."""

    name: ClassVar[str] = "large"
    kind: ClassVar[LeafKind] = LargeLayout.kind
    layout: ClassVar[type] = LargeLayout
    caches: ClassVar[bool] = True
    stacked: ClassVar[bool] = True

    def positions(self, plan: TreePlan) -> dict[int, tuple[int, ...]]:
        return {}  # each large leaf has factors of its own

    def real_entries(self, plan: LeafPlan[LargeLayout]) -> int:
        return plan.layout.strips

    def entry_axes(self, plan: TreePlan, axis_name: AxisNames) -> tuple[AxisNames, ...]:
        return tuple(stack_names(plan.leaves[i], axis_name) for i in plan.of_kind(self.kind))

    def init(self, plan: TreePlan, config: Config) -> State:
        """The factors of every large leaf."""
        return tuple(_init_leaf(plan.leaves[i], config) for i in plan.of_kind(self.kind))

    def init_cache(self, part: State, config: Config, symmetric: bool) -> Cache:
        """The sides of each large leaf's initial factors."""
        return tuple(initial_sides(_factors(s), symmetric, config.compute_dtype) for s in part)

    def update(
        self,
        ctx: StepContext,
        inputs: dict[int, Float[Array, "B m n"]],
        part: State,
        cache: Cache | None,
        slots: dict[int, Int[Array, " 1"]],
        plan: TreePlan,
        refresh: bool,
        axis_name: AxisNames,
    ) -> tuple[dict[int, Float[Array, "B m n"]], State, Float[Array, " leaves"], Cache | None]:
        """Precondition every large leaf (each is one stack of strips); update the factors
        too when `refresh`. A large leaf has its own factors, so `slots` is not needed."""
        del slots
        states = self.by_leaf(part, plan)
        cached = None if cache is None else self.by_leaf(cache, plan)
        outputs = {}
        sum_sq = jnp.zeros(len(plan.leaves), jnp.float32)
        for i, x in inputs.items():
            sides = None if cached is None else cached[i]
            outputs[i], states[i], sides = _update_leaf(
                ctx, x, states[i], sides, plan.leaves[i], refresh, axis_name
            )
            if cached is not None:
                cached[i] = sides
            sum_sq = sum_sq.at[i].set(jnp.sum(jnp.square(outputs[i].astype(jnp.float32))))
        new_cache = None if cached is None else self.in_order(cached, plan)
        return outputs, self.in_order(states, plan), sum_sq, new_cache
