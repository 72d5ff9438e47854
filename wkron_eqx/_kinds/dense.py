"""DENSE_PATH: 2-D leaves with both sides <= `max_size_dense`.

Each leaf is cut into tiles of at most `block_size x block_size`, each with its own
dense factors sized to the tile (rounded up to `TILE_QUANTUM`), not to `block_size`.
Tiles of equal stored size share a `DenseState` bucket, whatever leaf they come from,
and each compute group of buckets (`_layout.Grouping`: small merges on the CPU,
generous ones on an accelerator) is one batched computation, zero-padded to the
group's size. Each leaf's tiles are cut out of their bucket at a runtime position
(`WhiteKronState.slots`), so that all leaves of one shape share their kernels.
"""

import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._blocking import (
    join_runs,
    join_static,
    pad_runs,
    padded_identity,
    per_shard,
    run_slice,
    take_runs,
    tile,
    untile,
    validity_mask,
    zero_pad,
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
from .._layout import Bucket, ComputeGroup, DenseLayout, GroupMember, LeafKind, TreePlan
from .._noise import add_noise
from .._sharding import constrain_stack
from .._state import DenseState
from ._base import AbstractKind, FactorStack


State = tuple[DenseState, ...]
Cache = tuple[StackCache, ...]  # the stored sides of each bucket (`cache_preconditioner`)


class _Table(NamedTuple):
    """Static facts of each entry of a bucket, in storage order (`Bucket`)."""

    owner: np.ndarray  # its leaf (the number of leaves for a pipeline dummy)
    layer: np.ndarray  # its layer, numbered by `_layer_offsets` (one past the last: dummy)
    rows: np.ndarray  # valid rows (0 for a dummy)
    cols: np.ndarray  # valid cols
    real: np.ndarray  # 1 for a real tile, 0 for a dummy


@functools.lru_cache(maxsize=8)
def _tables(plan: TreePlan) -> tuple[_Table, ...]:
    """Each bucket's `_Table` (cached: static data of a plan)."""
    offsets = _layer_offsets(plan)
    leaves = len(plan.leaves)
    tables = []
    for bucket in plan.buckets:
        runs: list[np.ndarray] = []  # per run and segment: a [5, entries] block
        for shard in range(bucket.shards):
            for seg in bucket.segments:
                leaf = plan.leaves[seg.leaf]
                group = leaf.layout.groups[seg.group]
                # A tile group's tiles are layer-major (`tile`).
                tiles = np.arange(seg.count // bucket.shards)
                layer = leaf.view_layers()[shard * leaf.batch + tiles // group.tiles]
                facts = (seg.leaf, 0, group.row_part.size, group.col_part.size, 1)
                block = np.repeat(np.array(facts)[:, None], len(tiles), axis=1)
                block[1] = offsets[seg.leaf] + layer
                runs.append(block)
            dummies = bucket.run - bucket.valid_count // bucket.shards
            runs.append(np.repeat(np.array([[leaves], [offsets[-1]], [0], [0], [0]]), dummies, 1))
        tables.append(_Table(*np.concatenate(runs, axis=1).astype(np.int32)))
    return tuple(tables)


def _factors(state: DenseState) -> Factors:
    return Factors(state.Ql, state.Qr, state.Ll, state.Lr)


class _Entries(NamedTuple):
    """A stack of tiles as a compute group sees it: oriented and padded."""

    G: Float[Array, "s r c"]
    factors: Factors
    valid_rows: Int[Array, " s"]
    valid_cols: Int[Array, " s"]
    real: np.ndarray  # 1 for a real tile, 0 for a pipeline dummy
    sides: StackCache | None


def _pad_to(x: Array, *sides: int) -> Array:
    pads = [(0, 0)] + [(0, side - n) for n, side in zip(x.shape[1:], sides, strict=True)]
    return zero_pad(x, pads)


def _enter(
    member: GroupMember,
    group: ComputeGroup,
    table: _Table,
    state: DenseState,
    G,
    sides: StackCache | None,
) -> _Entries:
    """One bucket as its group sees it: transposed (left and right swapped) if the
    member says so, then zero-padded to the group's size."""
    left = (state.Ql, state.Ll, state.valid_rows)
    right = (state.Qr, state.Lr, state.valid_cols)
    if member.transposed:
        G = jnp.swapaxes(G, 1, 2)
        left, right = right, left
        sides = None if sides is None else StackCache(sides.Pr, sides.Pl)
    if sides is not None:
        sides = StackCache(
            _pad_to(sides.Pl, group.rows, group.rows), _pad_to(sides.Pr, group.cols, group.cols)
        )
    return _Entries(
        _pad_to(G, group.rows, group.cols),
        Factors(
            _pad_to(left[0], group.rows, group.rows),
            _pad_to(right[0], group.cols, group.cols),
            left[1],
            right[1],
        ),
        left[2],
        right[2],
        table.real,
        sides,
    )


def _leave(
    member: GroupMember,
    bucket: Bucket,
    state: DenseState,
    out: Array,
    factors: Factors | None,
    sides: StackCache | None,
) -> tuple[Array, DenseState, StackCache | None]:
    """Undo `_enter` for one member's slice of the group's results."""
    rows, cols = (bucket.cols, bucket.rows) if member.transposed else (bucket.rows, bucket.cols)
    out = out[:, :rows, :cols]
    if member.transposed:
        out = jnp.swapaxes(out, 1, 2)
    if sides is not None:
        sides = StackCache(sides.Pl[:, :rows, :rows], sides.Pr[:, :cols, :cols])
        if member.transposed:
            sides = StackCache(sides.Pr, sides.Pl)
    if factors is None:
        return out, state, sides
    Ql, Qr = factors.Ql[:, :rows, :rows], factors.Qr[:, :cols, :cols]
    Ll, Lr = factors.Ll, factors.Lr
    if member.transposed:
        Ql, Qr, Ll, Lr = Qr, Ql, Lr, Ll
    return out, state.replace(Ql=Ql, Qr=Qr, Ll=Ll, Lr=Lr), sides


@functools.lru_cache(maxsize=8)
def tile_starts(plan: TreePlan) -> dict[tuple[int, int], tuple[int, int, int]]:
    """`(leaf, tile group) -> (bucket index, first entry, entries)`: where each tile
    group of each dense leaf sits in its bucket's runs (the same place in each shard's
    run; cached: `preconditioner_stats` asks once per leaf; callers do not modify it)."""
    starts = {}
    for b, bucket in enumerate(plan.buckets):
        start = 0
        for seg in bucket.segments:
            count = seg.count // bucket.shards
            starts[(seg.leaf, seg.group)] = (b, start, count)
            start += count
    return starts


def _layer_offsets(plan: TreePlan) -> np.ndarray:
    """Where each leaf's layers start in a numbering of every layer of every leaf."""
    return np.cumsum([0] + [leaf.layers for leaf in plan.leaves])


def _initial_scales(ctx: StepContext, stacks: list[Array], plan: TreePlan) -> list[Array]:
    """Per bucket, the scale of each tile's factors on the first step: its layer's
    (`initial_scales`), from the sum of `G^2` over all the layer's tiles, whichever
    buckets (and shards) they are in."""
    assert ctx.first is not None
    layers = [table.layer for table in _tables(plan)]
    count = int(_layer_offsets(plan)[-1])
    sums = jax.ops.segment_sum(
        jnp.concatenate([sum_powers(G) for G in stacks]), np.concatenate(layers), count + 1
    )
    sizes = np.array([leaf.layer_size for leaf in plan.leaves for _ in range(leaf.layers)])
    scales = initial_scales(sums, np.append(np.maximum(sizes, 1), 1), ctx.first, factors=2)
    return [scales[layer] for layer in layers]


def _per_shard(fn, x, leaf):
    """`fn(x, leaf)` for one shard's `x`, applied to each shard's run of `x`."""
    return per_shard(lambda y: fn(y, leaf), leaf.shards)(x)


def _stack_names(bucket: Bucket | ComputeGroup, axis_name: AxisNames) -> AxisNames:
    """The mesh axes a bucket's (or compute group's) stack is sharded over."""
    return bucket.axes or axis_name


class DenseKind(AbstractKind[State, Cache]):
    """`DENSE_PATH`: the buckets of every dense leaf's tiles (`WhiteKronState.dense`)."""

    name: ClassVar[str] = "dense"
    kind: ClassVar[LeafKind] = DenseLayout.kind  # (the layout names the kind)
    layout: ClassVar[type] = DenseLayout
    caches: ClassVar[bool] = True
    stacked: ClassVar[bool] = True

    def positions(self, plan: TreePlan) -> dict[int, tuple[int, ...]]:
        # The first entry of each tile group in its bucket (0 for an empty group).
        starts = tile_starts(plan)
        return {
            i: tuple(
                starts.get((i, g), (0, 0, 0))[1] for g in range(len(plan.leaves[i].layout.groups))
            )
            for i in plan.of_kind(self.kind)
        }

    def entry_axes(self, plan: TreePlan, axis_name: AxisNames) -> tuple[AxisNames, ...]:
        return tuple(_stack_names(bucket, axis_name) for bucket in plan.buckets)

    def factor_stacks(self, part: State, plan: TreePlan, index: int) -> list[FactorStack]:
        stacks, starts = [], tile_starts(plan)
        for g in range(len(plan.leaves[index].layout.groups)):
            if (index, g) in starts:
                b, start, count = starts[(index, g)]
                d = part[b]
                stack = FactorStack(d.Ql, d.Qr, d.Ll, d.Lr, d.valid_rows, d.valid_cols)
                stacks.append(stack.runs(plan.buckets[b].shards, start, count))
        return stacks

    def init(self, plan: TreePlan, config: Config) -> State:
        """Padded identities (scaled by `preconditioner_init_scale`) for every bucket."""
        dtype, scale = config.compute_dtype, config.initial_scale
        states = []
        for bucket, table in zip(plan.buckets, _tables(plan), strict=True):
            valid_rows, valid_cols = jnp.asarray(table.rows), jnp.asarray(table.cols)
            states.append(
                DenseState(
                    Ql=padded_identity(valid_rows, bucket.rows, scale, dtype),
                    Qr=padded_identity(valid_cols, bucket.cols, scale, dtype),
                    Ll=jnp.zeros(bucket.stack, jnp.float32),
                    Lr=jnp.zeros(bucket.stack, jnp.float32),
                    valid_rows=valid_rows,
                    valid_cols=valid_cols,
                    valid_count=bucket.valid_count,
                    block_size=config.block_size,
                )
            )
        return tuple(states)

    def init_cache(self, part: State, config: Config, symmetric: bool) -> Cache:
        """The sides of each bucket's initial factors."""
        del config
        return tuple(initial_sides(_factors(b), symmetric, b.Ql.dtype) for b in part)

    def update(
        self,
        ctx: StepContext,
        inputs: dict[int, Float[Array, "B m n"]],
        part: State,
        cache: Cache | None,
        slots: dict[int, Int[Array, " k"]],
        plan: TreePlan,
        refresh: bool,
        axis_name: AxisNames,
    ) -> tuple[dict[int, Float[Array, "B m n"]], State, Float[Array, " leaves"], Cache | None]:
        """Precondition every dense leaf; update the factors too when `refresh`.

        **Arguments:**

        - `inputs`: leaf index -> the leaf viewed as `[B, m, n]`, for every dense leaf.
        - `part`: the current `DenseState`s, in `plan.buckets` order.
        - `cache`: the buckets' stored sides (`cache_preconditioner`), or `None`.
        - `slots`: leaf index -> its `WhiteKronState.slots` entry: the leaf's index, then
          the first entry of each of its tile groups in its bucket.

        **Returns:**

        `(outputs, new buckets, sums of squares, new cache)`: the outputs keyed like
        `inputs`, and each leaf's sum of squared outputs (0 for leaves of other kinds).
        """
        tiles = {i: _per_shard(tile, x, plan.leaves[i]) for i, x in inputs.items()}
        stacks = []
        for bucket in plan.buckets:
            G = join_runs([tiles[s.leaf][s.group] for s in bucket.segments], bucket.shards)
            G = pad_runs(G, bucket.shards, bucket.run).astype(ctx.product_dtype)
            stacks.append(ctx.corrected(G))
        starts = None
        if refresh and ctx.first is not None and stacks:
            starts = _initial_scales(ctx, stacks, plan)
        results: list[Array] = [jnp.zeros(())] * len(plan.buckets)
        new_part = list(part)
        new_cache = None if cache is None else list(cache)
        leaves = len(plan.leaves)
        sum_sq = jnp.zeros(leaves, jnp.float32)
        tables = _tables(plan)
        for group in plan.groups:
            shards = group.shards
            join = lambda xs: join_runs(list(xs), shards)
            entries = [
                _enter(
                    m,
                    group,
                    tables[m.bucket],
                    part[m.bucket],
                    stacks[m.bucket],
                    None if cache is None else cache[m.bucket],
                )
                for m in group.members
            ]
            G = constrain_stack(join([e.G for e in entries]), _stack_names(group, axis_name))
            factors = Factors(*(join(f) for f in zip(*[e.factors for e in entries])))
            valid_rows = join([e.valid_rows for e in entries])
            valid_cols = join([e.valid_cols for e in entries])
            sides = None
            if cache is not None:
                sides = StackCache(*(join(g) for g in zip(*[e.sides for e in entries])))
            if starts is not None:
                factors = rescaled(factors, join([starts[m.bucket] for m in group.members]))
            if refresh:
                # Pipeline dummies draw no noise: entries are numbered among the real ones.
                real = np.maximum(np.cumsum(join_static([e.real for e in entries], shards)) - 1, 0)
                valid = validity_mask(valid_rows, valid_cols, group.rows, group.cols)
                Gn = add_noise(G, ctx.step, ctx.noise_scale, valid, real)
                out, factors, sides = update_stack(
                    ctx, G, Gn, factors, valid_rows, valid_cols, cache=cache is not None
                )
            else:
                out = apply_stack(ctx.rule, G, factors, sides)
            # Per-leaf sums of squares of the output from one reduction over the group's
            # tiles (padding and dummies are zero), for the RMS clip.
            owner = join_static([tables[m.bucket].owner for m in group.members], shards)
            tile_sum_sq = jnp.sum(jnp.square(out.astype(jnp.float32)), axis=(1, 2))
            sum_sq = sum_sq + jax.ops.segment_sum(tile_sum_sq, owner, leaves + 1)[:leaves]
            offset = 0
            for m in group.members:
                run = plan.buckets[m.bucket].run
                mine = functools.partial(run_slice, shards=shards, start=offset, size=run)
                offset += run
                my_factors = Factors(*(mine(f) for f in factors)) if refresh else None
                my_sides = None
                if sides is not None and refresh:
                    my_sides = StackCache(*(mine(g) for g in sides))
                results[m.bucket], bucket_state, my_sides = _leave(
                    m, plan.buckets[m.bucket], part[m.bucket], mine(out), my_factors, my_sides
                )
                if new_cache is not None and my_sides is not None:
                    new_cache[m.bucket] = my_sides
                new_part[m.bucket] = bucket_state
        pieces: dict[int, list[Array]] = {
            i: [jnp.zeros(())] * len(plan.leaves[i].layout.groups) for i in inputs
        }
        for bucket, result in zip(plan.buckets, results, strict=True):
            for seg in bucket.segments:
                # A runtime start (see `_kinds.leaf_slots`): leaves of one shape in one
                # bucket are then cut out by one shared kernel.
                start = slots[seg.leaf][1 + seg.group]
                count = seg.count // bucket.shards
                pieces[seg.leaf][seg.group] = take_runs(result, bucket.shards, start, count)
        outputs = {i: _per_shard(untile, tuple(pieces[i]), plan.leaves[i]) for i in inputs}
        return outputs, tuple(new_part), sum_sq, None if new_cache is None else tuple(new_cache)
