"""Pure Python on static shapes: merge a leaf to at most 2-D, pick its kind, plan its tiles.

Nothing here traces: every function takes and returns hashable Python values, so a
plan can be cached and used as static data inside `jit`.
"""

import dataclasses
import enum
import functools
import math
from typing import Generic, NamedTuple, TypeVar

import numpy as np


# Tile sides are rounded up to a multiple of this (but never past `block_size`), so that
# tiles of nearly equal size share one batched stack without paying for a full block.
TILE_QUANTUM = 8


class LeafKind(enum.IntEnum):
    """How a parameter leaf is preconditioned."""

    DENSE = 0
    LARGE = 1
    ONE_D = 2


DENSE_PATH = LeafKind.DENSE
LARGE_PATH = LeafKind.LARGE
ONE_D_PATH = LeafKind.ONE_D


class ShardGrid(NamedTuple):
    """How one leaf is split over a mesh: along dimension `d` of the whole leaf (its
    scanned axis included) into `counts[d]` shards over the mesh axes `names[d]`.

    A leaf with a grid is planned shard by shard: each shard is tiled on its own (no
    tile crosses a shard boundary), and its entries in a stack sit together, shards
    numbered row-major over `counts` (the order of the mesh axes in `axes`).
    `spread` names replica axes (of `pipeline_axis_name`, not sharding the leaf) that
    each shard's entries are further spread over, `spread_size` devices in all.
    """

    counts: tuple[int, ...]
    names: tuple[tuple[str, ...], ...]
    spread: tuple[str, ...] = ()
    spread_size: int = 1

    @property
    def shards(self) -> int:
        return math.prod(self.counts)

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axes the shards are numbered over, major first."""
        return tuple(n for names, c in zip(self.names, self.counts) if c > 1 for n in names)

    @property
    def stack_axes(self) -> tuple[str, ...]:
        """The mesh axes a stack of this leaf's entries is sharded over (its leading axis)."""
        return self.axes + self.spread

    @property
    def spec(self) -> tuple[str | tuple[str, ...] | None, ...]:
        """The leaf's own `PartitionSpec` entries."""
        return tuple(None if not n else n[0] if len(n) == 1 else n for n in self.names)


def merge_split(shape: tuple[int, ...]) -> int | None:
    """Where `merge_shape` splits `shape` into rows and columns: `(prod(shape[:k]),
    prod(shape[k:]))` for the returned `k`, or `None` for a 1-D view."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or math.prod(shape) == max(shape):
        return None
    if len(shape) == 2:
        return 1
    best, best_ratio = None, math.inf
    for split in range(1, len(shape)):
        left, right = math.prod(shape[:split]), math.prod(shape[split:])
        small, large = min(left, right), max(left, right)
        ratio = large / small if small > 0 else math.inf
        if best is None or ratio < best_ratio:
            best, best_ratio = split, ratio
    return best


def merge_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Merge a shape to one or two dims (a 1-D view for vectors and shapes whose merge
    leaves one dimension, else `(rows, cols)`).

    **Arguments:**

    - `shape`: the leaf's shape without any scanned axis.

    **Returns:**

    `(length,)` for a 1-D view, `(rows, cols)` for a 2-D one.
    """
    shape = tuple(int(d) for d in shape)
    split = merge_split(shape)
    if split is None:
        return (math.prod(shape),)
    return math.prod(shape[:split]), math.prod(shape[split:])


def tile_side(size: int, block_size: int) -> int:
    """The stored side of a tile whose valid side is `size` (right-sized, not `block_size`)."""
    if size <= 0:
        return 0
    return min(block_size, -(-size // TILE_QUANTUM) * TILE_QUANTUM)


class Part(NamedTuple):
    """A run of `count` equal tiles of valid side `size` starting at `start` along one axis."""

    start: int
    count: int
    size: int


def split_axis(length: int, block_size: int) -> tuple[Part, ...]:
    """Cut an axis of `length` into full `block_size` tiles and one shorter edge tile."""
    full, edge = divmod(length, block_size)
    parts = []
    if full:
        parts.append(Part(0, full, block_size))
    if edge:
        parts.append(Part(full * block_size, 1, edge))
    return tuple(parts)


def pad_to_multiple(count: int, multiple: int) -> int:
    """The stack size after adding dummy entries up to a multiple of `multiple`."""
    return -(-count // multiple) * multiple


class TileGroup(NamedTuple):
    """Tiles of one dense leaf that share a valid size; they go to one bucket."""

    row_part: Part
    col_part: Part
    bucket: tuple[int, int]  # (stored rows, stored cols)

    @property
    def tiles(self) -> int:
        """Its tiles in one layer."""
        return self.row_part.count * self.col_part.count


class DenseLayout(NamedTuple):
    """How a `DENSE` leaf is cut into tiles, which go to the shared buckets."""

    kind = LeafKind.DENSE  # (a class attribute, not a field)
    row_parts: tuple[Part, ...]
    col_parts: tuple[Part, ...]
    groups: tuple[TileGroup, ...]  # one per (row part, col part)
    tiles: int  # real tiles over the whole batch (of one shard)

    @property
    def tiles_per_layer(self) -> int:
        return sum(g.tiles for g in self.groups)

    # What `LeafState` says of the leaf (see there).
    @property
    def nr(self) -> int:
        return sum(p.count for p in self.row_parts)

    @property
    def nc(self) -> int:
        return sum(p.count for p in self.col_parts)

    @property
    def diag_left(self) -> bool:
        return False

    @property
    def diag_right(self) -> bool:
        return False

    @property
    def stack(self) -> int:
        return self.tiles


class LargeLayout(NamedTuple):
    """How a `LARGE` leaf is cut into strips along its dense side (none when both sides
    are diagonal: then each layer is one strip); the strips are the leaf's own stack."""

    kind = LeafKind.LARGE
    diag_left: bool
    diag_right: bool
    row_parts: tuple[Part, ...]  # the strips' cut of a dense left side, else ()
    col_parts: tuple[Part, ...]  # the strips' cut of a dense right side, else ()
    strip_side: int  # stored width of the dense side (0 if both sides are diagonal)
    strips: int  # real strips over the whole batch (of one shard)
    stack: int  # strips plus pipeline dummies (of one shard)

    # A side with no strips (a diagonal one) counts as one.
    @property
    def nr(self) -> int:
        return sum(p.count for p in self.row_parts) or 1

    @property
    def nc(self) -> int:
        return sum(p.count for p in self.col_parts) or 1


class OneDLayout(NamedTuple):
    """A `ONE_D` leaf: one diagonal factor per layer, no tiles."""

    kind = LeafKind.ONE_D
    stack: int  # entries of its stacked factor: one per layer

    # What `LeafState` says of the leaf (see there).
    @property
    def nr(self) -> int:
        return 1

    @property
    def nc(self) -> int:
        return 1

    @property
    def diag_left(self) -> bool:
        return True

    @property
    def diag_right(self) -> bool:
        return False


_L = TypeVar("_L", DenseLayout, LargeLayout, OneDLayout)


@dataclasses.dataclass(frozen=True)
class LeafPlan(Generic[_L]):
    """Everything static about how one leaf is preconditioned: what every kind has,
    and its kind's own `layout` (`LeafPlan[DenseLayout]` for a dense leaf, ...), whose
    type is the leaf's `kind`.

    For a leaf with a `grid` (planned shard by shard), `batch`, `shape`, `merged` and
    `layout` describe one shard; the kind (which sides are diagonal) follows the whole
    leaf. The step sees such a leaf as `[shards * batch, *merged]`, shard-major
    (`_blocking.leaf_view`).
    """

    scanned: bool
    batch: int  # B: the scanned stack size, 1 when not scanned (of one shard)
    shape: tuple[int, ...]  # without the scanned axis (of one shard)
    merged: tuple[int, ...]
    block_size: int
    layout: _L
    grid: ShardGrid | None = None

    @property
    def kind(self) -> LeafKind:
        return self.layout.kind

    @property
    def shards(self) -> int:
        return 1 if self.grid is None else self.grid.shards

    @property
    def local_shape(self) -> tuple[int, ...]:
        """One shard's shape (its scanned axis included); the whole leaf's without a grid."""
        return ((self.batch,) if self.scanned else ()) + self.shape

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """The whole leaf's shape (its scanned axis included)."""
        if self.grid is None:
            return self.local_shape
        return tuple(d * c for d, c in zip(self.local_shape, self.grid.counts, strict=True))

    @property
    def layers(self) -> int:
        """The whole leaf's layers (1 when not scanned)."""
        return self.leaf_shape[0] if self.scanned else 1

    @property
    def layer_size(self) -> int:
        """Elements in one whole layer."""
        return math.prod(self.leaf_shape[1:] if self.scanned else self.leaf_shape)

    def view_layers(self) -> np.ndarray:
        """For each of the `shards * batch` layers of the step's view, the layer of the
        whole leaf it is part of."""
        local = np.arange(self.batch)
        if self.grid is None or not self.scanned:
            return np.tile(local, self.shards)
        # Shard `s`'s index along the scanned axis: its major digit (row-major numbering).
        along = np.arange(self.shards) // (self.shards // self.grid.counts[0])
        return (along[:, None] * self.batch + local[None, :]).reshape(-1)


MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")


def diagonal_sides(
    rows: int, cols: int, max_size_dense: int, memory_save_mode: str | None = None
) -> tuple[bool, bool]:
    """Which sides of a `rows x cols` matrix leaf get a diagonal factor.

    A side longer than `max_size_dense` always does. `"one_diag"` also makes the longer
    side diagonal, the right one (the last dimension) when both are equal; `"all_diag"`
    makes both diagonal.
    """
    left, right = rows > max_size_dense, cols > max_size_dense
    if rows == 0 or cols == 0:
        return left, right  # an empty leaf has nothing to save
    if memory_save_mode == "all_diag":
        return True, True
    if memory_save_mode == "one_diag":
        return left or rows > cols, right or cols >= rows
    return left, right


def _local(shape: tuple[int, ...], grid: ShardGrid) -> tuple[int, ...]:
    return tuple(d // c for d, c in zip(shape, grid.counts, strict=True))


def leaf_plan(
    shape: tuple[int, ...],
    scanned: bool,
    block_size: int,
    max_size_dense: int,
    pipeline_axis_size: int,
    memory_save_mode: str | None = None,
    grid: ShardGrid | None = None,
) -> LeafPlan:
    """Plan one leaf: its kind, merged view and tiles or strips (see `plan_tree`).

    With a `grid` (whose counts divide `shape`), the kind follows the whole leaf and
    the tiles or strips one shard; a 1-D view, or a grid of one shard, is planned
    whole."""
    if scanned and len(shape) == 0:
        raise ValueError("a scanned leaf needs a leading axis, got a 0-d leaf.")
    whole = shape[1:] if scanned else shape
    split = merge_split(whole)
    if grid is not None and (split is None or grid.shards == 1 or math.prod(shape) == 0):
        grid = None
    if grid is not None:
        shape = _local(shape, grid)
    batch, shape = (shape[0], shape[1:]) if scanned else (1, shape)
    # A shard is merged where the whole leaf is (even to a 1 x n view).
    merged = (math.prod(shape),)
    if split is not None:
        merged = (math.prod(shape[:split]), math.prod(shape[split:]))
    pad = pipeline_axis_size if grid is None else grid.spread_size

    def plan(layout: _L) -> LeafPlan[_L]:
        return LeafPlan(scanned, batch, shape, merged, block_size, layout, grid)

    if len(merged) == 1:
        return plan(OneDLayout(stack=batch))
    assert split is not None
    rows, cols = merged
    whole_rows, whole_cols = math.prod(whole[:split]), math.prod(whole[split:])
    diag_left, diag_right = diagonal_sides(whole_rows, whole_cols, max_size_dense, memory_save_mode)
    if not (diag_left or diag_right):
        row_parts = split_axis(rows, block_size)
        col_parts = split_axis(cols, block_size)
        groups = tuple(
            TileGroup(rp, cp, (tile_side(rp.size, block_size), tile_side(cp.size, block_size)))
            for rp in row_parts
            for cp in col_parts
        )
        tiles = batch * sum(g.tiles for g in groups)
        return plan(DenseLayout(row_parts, col_parts, groups, tiles))
    if diag_left and diag_right:
        row_parts, col_parts, strip_side, strips = (), (), 0, batch
    elif diag_left:
        row_parts, col_parts = (), split_axis(cols, block_size)
        strip_side = tile_side(min(cols, block_size), block_size)
        strips = batch * sum(p.count for p in col_parts)
    else:
        row_parts, col_parts = split_axis(rows, block_size), ()
        strip_side = tile_side(min(rows, block_size), block_size)
        strips = batch * sum(p.count for p in row_parts)
    stack = pad_to_multiple(strips, pad)
    return plan(LargeLayout(diag_left, diag_right, row_parts, col_parts, strip_side, strips, stack))


class BucketSegment(NamedTuple):
    """`count` consecutive tiles of one bucket, taken from one tile group of one leaf."""

    leaf: int
    group: int
    count: int


class Bucket(NamedTuple):
    """One batched stack of dense tiles of equal stored size: one `DenseState`.

    A bucket of leaves planned by shard (`ShardGrid`) holds `shards` equal runs of
    entries, shard-major: run `s` holds every leaf's tiles of shard `s`, then its
    dummies, and the stack is sharded over `axes` along its leading axis. A bucket of
    whole leaves has one run (`axes` empty: the stack follows `pipeline_axis_name`).
    """

    rows: int
    cols: int
    segments: tuple[BucketSegment, ...]  # counts over all shards
    valid_count: int  # real tiles (all shards)
    stack: int  # real tiles plus pipeline dummies (all shards)
    shards: int = 1
    axes: tuple[str, ...] = ()

    @property
    def run(self) -> int:
        """Entries of one shard's run (its real tiles and dummies)."""
        return self.stack // self.shards


class GroupMember(NamedTuple):
    """One bucket inside a compute group; `transposed` buckets enter as `G^T` with
    their left and right factors swapped (the same maths with the roles exchanged)."""

    bucket: int
    transposed: bool


class ComputeGroup(NamedTuple):
    """Buckets updated by one batched computation, each zero-padded to `rows x cols`.

    Storage stays right-sized (one `DenseState` per bucket); only the step's
    temporaries are padded. Zero padding of `G` and of the factors is inert (padded
    rows and columns stay zero and never reach a real output), so a bucket's result
    does not depend on its group. Its buckets share their `shards` and `axes`: the
    members' runs are joined shard by shard.
    """

    rows: int
    cols: int
    members: tuple[GroupMember, ...]
    shards: int = 1
    axes: tuple[str, ...] = ()


class Grouping(NamedTuple):
    """How dense buckets are batched, a choice of the backend the step compiles for.

    `budget`: a merge of buckets into one compute group may add at most this fraction
    of the tree's dense factor-update cost as zero padding. A CPU pays for every FLOP
    (and for every compiled kernel), so its budget is small; an accelerator pays per
    kernel launch, so there buckets merge into as few computations as a generous
    budget allows.
    """

    budget: float


CPU_GROUPING = Grouping(budget=0.1)
ACCELERATOR_GROUPING = Grouping(budget=1.0)


def _tile_cost(rows: int, cols: int) -> int:
    # Multiply-adds of one factor update: applying each side twice (before and after
    # the update; a gram then a product, or two thin products, whichever is cheaper),
    # the statistics `Pg Pg^T` and `Pg^T Pg`, and the factor updates.
    left = min(rows**3 + rows * rows * cols, 2 * rows * rows * cols)
    right = min(cols**3 + rows * cols * cols, 2 * rows * cols * cols)
    return 2 * (left + right) + rows * cols * (rows + cols) + 2 * (rows**3 + cols**3)


def _merge(buckets: tuple[Bucket, ...], indices: list[int], fraction: float) -> list[ComputeGroup]:
    """Greedy merging of the buckets `indices` (of one `shards` and `axes`): the pair
    whose merge adds the least padded cost goes first, while the added cost stays
    within `fraction` of these buckets' own cost."""
    budget = fraction * sum(_cost(*_oriented(buckets[i]), buckets[i].stack) for i in indices)
    groups: list[tuple[int, int, tuple[GroupMember, ...], int]] = []
    for i in indices:
        b = buckets[i]
        groups.append((*_oriented(b), (GroupMember(i, b.rows > b.cols),), b.stack))
    while len(groups) > 1:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                (ri, ci, _, si), (rj, cj, _, sj) = groups[i], groups[j]
                extra = _cost(max(ri, rj), max(ci, cj), si + sj)
                extra -= _cost(ri, ci, si) + _cost(rj, cj, sj)
                if best is None or extra < best[0]:
                    best = (extra, i, j)
        assert best is not None
        extra, i, j = best
        if extra > budget:
            break
        budget -= extra
        (ri, ci, mi, si), (rj, cj, mj, sj) = groups[i], groups[j]
        groups[i] = (max(ri, rj), max(ci, cj), tuple(sorted(mi + mj)), si + sj)
        del groups[j]
    first = buckets[indices[0]]
    return [ComputeGroup(r, c, m, first.shards, first.axes) for r, c, m, _ in groups]


def _cost(rows: int, cols: int, stack: int) -> int:
    return stack * _tile_cost(rows, cols)


def _oriented(bucket: Bucket) -> tuple[int, int]:
    """A bucket's stored sides as its compute group sees them: `rows <= cols`."""
    return min(bucket.rows, bucket.cols), max(bucket.rows, bucket.cols)


def group_buckets(
    buckets: tuple[Bucket, ...], grouping: Grouping = CPU_GROUPING
) -> tuple[ComputeGroup, ...]:
    """Merge buckets into as few batched computations as the padding budget allows.

    Buckets are oriented with `rows <= cols` (a `(256, 16)` tile is a transposed
    `(16, 256)` one); then the two groups whose merge adds the least padded cost are
    merged, again and again, while the added cost stays within `grouping.budget` of
    the cost of their class. Only buckets of one `shards` and `axes` (a class) merge, so
    the padding stays within that fraction of the whole tree's cost too.
    """
    classes: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for i, b in enumerate(buckets):
        classes.setdefault((b.shards, b.axes), []).append(i)
    groups = [g for indices in classes.values() for g in _merge(buckets, indices, grouping.budget)]
    return tuple(sorted(groups, key=lambda g: g.members))


class TreePlan(NamedTuple):
    """The static plan of a whole params tree: per-leaf plans, the buckets of dense
    tiles (one `DenseState` each) and the compute groups that update them."""

    leaves: tuple[LeafPlan, ...]
    buckets: tuple[Bucket, ...]
    groups: tuple[ComputeGroup, ...]
    grouping: Grouping = CPU_GROUPING

    def of_kind(self, kind: LeafKind) -> tuple[int, ...]:
        """Indices of the leaves of `kind`."""
        return tuple(i for i, leaf in enumerate(self.leaves) if leaf.kind == kind)


def bucket_tiles(leaves: tuple[LeafPlan, ...], pipeline_axis_size: int) -> tuple[Bucket, ...]:
    """Group the dense tiles of `leaves` into buckets of equal stored size.

    Buckets are sorted by stored size; within a bucket, segments follow leaf order and
    then tile-group order. A bucket of whole leaves is padded to a multiple of
    `pipeline_axis_size`; leaves planned by shard go to buckets of their own grid's
    `stack_axes`, each shard's run padded to a multiple of its `spread_size`.
    """
    segments: dict[tuple, list[BucketSegment]] = {}
    for leaf_index, leaf in enumerate(leaves):
        if not isinstance(leaf.layout, DenseLayout):
            continue
        grid = leaf.grid
        key = (1, (), pipeline_axis_size)
        if grid is not None:
            key = (grid.shards, grid.stack_axes, grid.spread_size)
        for group_index, group in enumerate(leaf.layout.groups):
            count = leaf.shards * leaf.batch * group.tiles
            if count:
                segments.setdefault(group.bucket + key, []).append(
                    BucketSegment(leaf_index, group_index, count)
                )
    buckets = []
    for (rows, cols, shards, axes, pad), segs in sorted(segments.items()):
        valid = sum(s.count for s in segs)
        stack = shards * pad_to_multiple(valid // shards, pad)
        buckets.append(Bucket(rows, cols, tuple(segs), valid, stack, shards, axes))
    return tuple(buckets)


@functools.lru_cache(maxsize=512)
def plan_tree(
    shapes: tuple[tuple[int, ...], ...],
    scanned: tuple[bool, ...],
    block_size: int,
    max_size_dense: int,
    pipeline_axis_size: int,
    grouping: Grouping = CPU_GROUPING,
    memory_save_mode: str | None = None,
    grids: tuple[ShardGrid | None, ...] | None = None,
) -> TreePlan:
    """Plan every leaf of a flattened params tree and group dense tiles into buckets.

    **Arguments:**

    - `shapes`: the shape of every leaf, in flattening order.
    - `scanned`: for each leaf, whether its leading axis is a stack of layers.
    - `block_size`, `max_size_dense`, `pipeline_axis_size`: as in `scale_by_quad`.
    - `grouping`: how tiles are batched (the `Backend`'s).
    - `memory_save_mode`: which sides get diagonal factors besides the long ones
      (`diagonal_sides`).
    - `grids`: for each leaf, how it is sharded (`ShardGrid`: it is then planned shard
      by shard), or `None` (planned whole); `None` for all when not given.

    **Returns:**

    A `TreePlan`: one `LeafPlan` per leaf, the dense tile buckets (`bucket_tiles`)
    and their compute groups (`group_buckets`).
    """
    if grids is None:
        grids = (None,) * len(shapes)
    leaves = tuple(
        leaf_plan(
            tuple(s),
            bool(f),
            block_size,
            max_size_dense,
            pipeline_axis_size,
            memory_save_mode,
            grid,
        )
        for s, f, grid in zip(shapes, scanned, grids, strict=True)
    )
    buckets = bucket_tiles(leaves, pipeline_axis_size)
    return TreePlan(leaves, buckets, group_buckets(buckets, grouping), grouping)
