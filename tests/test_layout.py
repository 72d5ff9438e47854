"""The static tile plan (`_layout.py`) against an independent re-derivation of its rules
(shape merging, kinds, tiling, right-sized tiles), on arbitrary shapes. Pure Python, no
jit."""

import collections
import math

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk
import wkron_eqx.testing as wkt
from wkron_eqx._kinds import kind_of, leaf_slots
from wkron_eqx._layout import (
    LargeLayout,
    LeafKind,
    OneDLayout,
    Part,
    leaf_plan,
    merge_shape,
    plan_tree,
)

from .plan_rules import (
    assert_parts_contiguous,
    expected_kind,
    expected_merge,
    expected_sides,
    expected_stored,
    parts_sides,
    smallest_multiple_at_least,
)


MANY = hypothesis.settings(max_examples=200, deadline=None)


# ---------------------------------------------------------------------------------------
# merge_shape and kinds


@MANY
@hypothesis.given(shape=wkt.leaf_shapes(block_size=4, max_dims=5))
def test_merge_shape_agrees_with_spec(shape):
    merged = merge_shape(shape)
    assert merged == expected_merge(shape)
    assert math.prod(merged) == math.prod(shape)
    assert len(merged) in (1, 2)


@pytest.mark.parametrize(
    "shape, merged",
    [
        ((), (1,)),
        ((0,), (0,)),
        ((7,), (7,)),
        ((1, 7), (7,)),
        ((7, 1), (7,)),
        ((1, 1), (1,)),
        ((0, 0), (0,)),
        ((0, 5), (0, 5)),
        ((5, 0), (5, 0)),
        ((3, 4), (3, 4)),
        ((1, 1, 9, 1), (9,)),
        ((2, 3, 4), (6, 4)),  # ratios 12/2=6, 6/4=1.5
        ((4, 3, 2), (4, 6)),  # ratios 6/4=1.5, 12/2=6
        ((2, 2, 2, 2), (4, 4)),
        ((3, 3, 8, 16), (72, 16)),  # ratios 384/3, 144/9, 72/16=4.5
        ((2, 8, 2), (2, 16)),  # ties (2, 16) and (16, 2): the first wins
        ((2, 0, 3), (2, 0)),  # every split has a 0 side: the first wins
    ],
)
def test_merge_shape_closed_forms(shape, merged):
    assert merge_shape(shape) == merged == expected_merge(shape)


@MANY
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(1, 16),
    k=wkt.pipeline_sizes(),
)
def test_leaf_kind_rules(data, block_size, k):
    shape = data.draw(wkt.leaf_shapes(block_size=block_size))
    max_size_dense = data.draw(st.integers(1, 3 * block_size))
    plan = leaf_plan(shape, False, block_size, max_size_dense, k)
    merged = expected_merge(shape)
    kind, diag_left, diag_right = expected_kind(merged, max_size_dense)
    assert plan.kind == kind
    assert plan.merged == merged and plan.shape == shape
    assert plan.batch == 1 and not plan.scanned and plan.block_size == block_size
    assert isinstance(plan.layout, kind_of(kind).layout)
    if kind != LeafKind.ONE_D:  # (a 1-D leaf's one factor is diagonal)
        assert (plan.layout.diag_left, plan.layout.diag_right) == (diag_left, diag_right)


@MANY
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(1, 16),
    k=wkt.pipeline_sizes(),
    mode=st.sampled_from(["one_diag", "all_diag"]),
)
def test_memory_save_modes_make_sides_diagonal(data, block_size, k, mode):
    """`one_diag`: the longer side of every non-empty matrix leaf is diagonal (the right
    one of a square leaf), besides the long ones; `all_diag`: both. Fewer factor entries
    than without, never more."""
    shape = data.draw(wkt.leaf_shapes(block_size=block_size))
    max_size_dense = data.draw(st.integers(1, 3 * block_size))
    plan = leaf_plan(shape, False, block_size, max_size_dense, k, mode)
    default = leaf_plan(shape, False, block_size, max_size_dense, k)
    merged = expected_merge(shape)
    if len(merged) == 1 or 0 in merged:
        assert plan == default  # vectors and empty leaves are unaffected
        return
    rows, cols = merged
    assert plan.kind == LeafKind.LARGE
    if mode == "all_diag":
        assert plan.layout.diag_left and plan.layout.diag_right
    else:
        long_left, long_right = rows > max_size_dense, cols > max_size_dense
        assert plan.layout.diag_left == (long_left or rows > cols)
        assert plan.layout.diag_right == (long_right or cols >= rows)

    def factor_entries(p):
        if p.kind == LeafKind.DENSE:
            return sum(
                p.batch
                * g.row_part.count
                * g.col_part.count
                * (g.bucket[0] ** 2 + g.bucket[1] ** 2)
                for g in p.layout.groups
            )
        left = rows if p.layout.diag_left else p.layout.strip_side**2
        right = cols if p.layout.diag_right else p.layout.strip_side**2
        return p.layout.strips * (left + right)

    assert factor_entries(plan) <= factor_entries(default)


# ---------------------------------------------------------------------------------------
# tile plans


def _check_dense(plan, batch: int, block_size: int):
    rows, cols = plan.merged
    assert_parts_contiguous(plan.layout.row_parts, rows)
    assert_parts_contiguous(plan.layout.col_parts, cols)
    row_sides, col_sides = parts_sides(plan.layout.row_parts), parts_sides(plan.layout.col_parts)
    assert row_sides == expected_sides(rows, block_size)
    assert col_sides == expected_sides(cols, block_size)
    # one group per (row part, col part), row-major
    assert [(g.row_part, g.col_part) for g in plan.layout.groups] == [
        (rp, cp) for rp in plan.layout.row_parts for cp in plan.layout.col_parts
    ]
    tiles = batch * len(row_sides) * len(col_sides)
    assert plan.layout.tiles_per_layer == len(row_sides) * len(col_sides)
    assert plan.layout.tiles == plan.layout.stack == tiles
    area = sum(
        batch * g.row_part.count * g.col_part.count * g.row_part.size * g.col_part.size
        for g in plan.layout.groups
    )
    assert area == batch * rows * cols == batch * math.prod(plan.shape)
    for g in plan.layout.groups:
        stored_rows, stored_cols = g.bucket
        assert stored_rows == expected_stored(g.row_part.size, block_size)
        assert stored_cols == expected_stored(g.col_part.size, block_size)
        for valid, stored in ((g.row_part.size, stored_rows), (g.col_part.size, stored_cols)):
            assert valid <= stored <= block_size
            assert stored == block_size or stored % 8 == 0
            assert stored - valid < 8


def _check_large(plan, batch: int, block_size: int, k: int):
    rows, cols = plan.merged
    layout = plan.layout
    if layout.diag_left and layout.diag_right:
        assert layout.row_parts == layout.col_parts == ()
        assert layout.strip_side == 0
        assert layout.strips == batch
        area = batch * rows * cols
    else:
        # The strips cut the dense side; the diagonal side has no parts.
        if layout.diag_left:
            (dense, length), (diagonal, other) = (layout.col_parts, cols), (layout.row_parts, rows)
        else:
            (dense, length), (diagonal, other) = (layout.row_parts, rows), (layout.col_parts, cols)
        assert diagonal == ()
        assert_parts_contiguous(dense, length)
        assert parts_sides(dense) == expected_sides(length, block_size)
        assert layout.strips == batch * math.ceil(length / block_size)
        assert layout.strip_side == expected_stored(min(length, block_size), block_size)
        area = batch * other * sum(parts_sides(dense))
    assert area == batch * math.prod(plan.shape)
    assert plan.layout.stack == smallest_multiple_at_least(plan.layout.strips, k)


def _check_leaf(plan, batch: int, block_size: int, k: int):
    if plan.kind == LeafKind.DENSE:
        _check_dense(plan, batch, block_size)
    elif plan.kind == LeafKind.LARGE:
        _check_large(plan, batch, block_size, k)
    else:
        assert plan.merged == (math.prod(plan.shape),)
        assert plan.layout == OneDLayout(stack=batch)  # not stacked across leaves


@MANY
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(1, 16),
    k=wkt.pipeline_sizes(),
)
def test_leaf_plan_tiles_cover_the_leaf(data, block_size, k):
    shape = data.draw(wkt.leaf_shapes(block_size=block_size))
    max_size_dense = data.draw(st.integers(1, 3 * block_size))
    plan = leaf_plan(shape, False, block_size, max_size_dense, k)
    _check_leaf(plan, 1, block_size, k)


@MANY
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(1, 16),
    k=wkt.pipeline_sizes(),
)
def test_scanned_plan_is_the_layer_plan_stacked(data, block_size, k):
    shape = data.draw(wkt.scanned_shapes(block_size=block_size, min_layers=0, max_layers=4))
    max_size_dense = data.draw(st.integers(1, 3 * block_size))
    plan = leaf_plan(shape, True, block_size, max_size_dense, k)
    layer = leaf_plan(shape[1:], False, block_size, max_size_dense, k)
    assert plan.scanned and plan.batch == shape[0] and plan.shape == shape[1:]
    assert (plan.kind, plan.merged) == (layer.kind, layer.merged)
    # The layers multiply the counts of entries and change nothing else.
    counts = ("tiles", "strips", "stack")
    rest = lambda layout: {k: v for k, v in layout._asdict().items() if k not in counts}
    assert rest(plan.layout) == rest(layer.layout)
    for field in set(counts) & set(plan.layout._fields) - {"stack"}:
        assert getattr(plan.layout, field) == shape[0] * getattr(layer.layout, field)
    _check_leaf(plan, shape[0], block_size, k)


@pytest.mark.parametrize(
    "shape, scanned, kind, merged, tiles",
    [
        ((), False, LeafKind.ONE_D, (1,), 0),
        ((0,), False, LeafKind.ONE_D, (0,), 0),
        ((0, 0), False, LeafKind.ONE_D, (0,), 0),
        ((0, 5), False, LeafKind.DENSE, (0, 5), 0),
        ((5, 0), False, LeafKind.DENSE, (5, 0), 0),
        ((1, 0), False, LeafKind.DENSE, (1, 0), 0),
        ((3, 0, 2, 2), False, LeafKind.DENSE, (3, 0), 0),
        ((0, 4, 5), True, LeafKind.DENSE, (4, 5), 0),
        ((3,), True, LeafKind.ONE_D, (1,), 0),
        ((2, 0, 7), True, LeafKind.DENSE, (0, 7), 0),
        ((9, 20), False, LeafKind.DENSE, (9, 20), 3 * 5),
        ((2, 9, 20), True, LeafKind.DENSE, (9, 20), 2 * 3 * 5),
    ],
)
def test_empty_and_scalar_leaves_are_planned(shape, scanned, kind, merged, tiles):
    plan = leaf_plan(shape, scanned, 4, 100, 3)
    assert (plan.kind, plan.merged) == (kind, merged)
    assert (plan.layout.tiles if kind == LeafKind.DENSE else 0) == tiles
    tree = plan_tree((shape, (6, 6)), (scanned, False), 4, 100, 3)
    assert sum(b.valid_count for b in tree.buckets) == tiles + 4


@pytest.mark.parametrize("shape", [(0, 40), (40, 0), (40, 0, 3)])
def test_empty_large_leaves_have_no_strips(shape):
    plan = leaf_plan(shape, False, 4, 10, 3)
    assert plan.kind == LeafKind.LARGE
    assert plan.layout.strips == plan.layout.stack == 0


def test_scanned_scalar_leaf_raises():
    with pytest.raises(ValueError, match="scanned"):
        leaf_plan((), True, 4, 100, 1)
    with pytest.raises(ValueError, match="scanned"):
        plan_tree(((3, 4), ()), (False, True), 4, 100, 1)
    tx = wk.scale_by_quad(scanned_layers={"a": False, "b": True}, block_size=4)
    with pytest.raises(ValueError, match="`scanned_layers`"):
        tx.init({"a": jnp.zeros((3, 4)), "b": jnp.zeros(())})


# ---------------------------------------------------------------------------------------
# buckets and pipeline dummies over whole trees


@st.composite
def _trees(draw):
    block_size = draw(wkt.block_sizes(1, 16))
    max_size_dense = draw(st.integers(1, 3 * block_size))
    k = draw(wkt.pipeline_sizes())
    count = draw(st.integers(1, 6))
    shapes, flags = [], []
    for _ in range(count):
        scanned = draw(st.booleans())
        strategy = wkt.scanned_shapes if scanned else wkt.leaf_shapes
        shapes.append(draw(strategy(block_size=block_size)))
        flags.append(scanned)
    return tuple(shapes), tuple(flags), block_size, max_size_dense, k


@MANY
@hypothesis.given(tree=_trees())
def test_buckets_hold_every_real_tile_once_plus_dummies(tree):
    shapes, flags, block_size, max_size_dense, k = tree
    plan = plan_tree(shapes, flags, block_size, max_size_dense, k)
    assert len(plan.leaves) == len(shapes)

    # Every real dense tile, re-derived: (stored rows, stored cols, valid rows, valid cols).
    expected = collections.Counter()
    for shape, scanned in zip(shapes, flags, strict=True):
        batch, layer = (shape[0], shape[1:]) if scanned else (1, shape)
        merged = expected_merge(layer)
        if expected_kind(merged, max_size_dense)[0] != LeafKind.DENSE:
            continue
        for r in expected_sides(merged[0], block_size):
            for c in expected_sides(merged[1], block_size):
                key = (expected_stored(r, block_size), expected_stored(c, block_size), r, c)
                expected[key] += batch

    got = collections.Counter()
    seen_groups = set()
    for bucket in plan.buckets:
        assert bucket.valid_count == sum(s.count for s in bucket.segments) > 0
        # pipeline dummies: the smallest multiple of k that holds the real tiles
        assert bucket.stack == smallest_multiple_at_least(bucket.valid_count, k)
        for seg in bucket.segments:
            leaf = plan.leaves[seg.leaf]
            group = leaf.layout.groups[seg.group]
            assert leaf.kind == LeafKind.DENSE
            assert group.bucket == (bucket.rows, bucket.cols)
            assert seg.count == leaf.batch * group.row_part.count * group.col_part.count
            assert (seg.leaf, seg.group) not in seen_groups
            seen_groups.add((seg.leaf, seg.group))
            got[(bucket.rows, bucket.cols, group.row_part.size, group.col_part.size)] += seg.count
    assert got == expected
    sizes = [(b.rows, b.cols) for b in plan.buckets]
    assert sizes == sorted(set(sizes))
    assert sum(b.valid_count for b in plan.buckets) == sum(
        p.layout.tiles for p in plan.leaves if p.kind == LeafKind.DENSE
    )
    for leaf in plan.leaves:
        _check_leaf(leaf, leaf.batch, block_size, k)


@MANY
@hypothesis.given(tree=_trees())
def test_leaf_slots_point_at_each_leafs_own_entries(tree):
    shapes, flags, block_size, max_size_dense, k = tree
    plan = plan_tree(shapes, flags, block_size, max_size_dense, k)
    slots = leaf_slots(plan)
    assert [s[0] for s in slots] == list(range(len(shapes)))
    # Each bucket's tiles, one by one: which (leaf, tile group) owns it.
    owners = {
        (b.rows, b.cols): [(s.leaf, s.group) for s in b.segments for _ in range(s.count)]
        for b in plan.buckets
    }
    element = layer = 0
    for i, (leaf, slot) in enumerate(zip(plan.leaves, slots, strict=True)):
        size = leaf.batch * math.prod(leaf.merged)
        if leaf.kind == LeafKind.DENSE:
            assert len(slot) == 1 + len(leaf.layout.groups)
            for g, (group, start) in enumerate(zip(leaf.layout.groups, slot[1:], strict=True)):
                count = leaf.batch * group.row_part.count * group.col_part.count
                if count:
                    assert owners[group.bucket][start : start + count] == [(i, g)] * count
        elif leaf.kind == LeafKind.ONE_D and size:
            # The 1-D leaves are concatenated in tree order, empty ones left out.
            assert slot == (i, element, layer)
            element, layer = element + size, layer + leaf.batch
        else:
            assert slot == (i,)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_pipeline_dummies_closed_form(k):
    # 20x20 with bs=8: valid sides 8, 8, 4 along each axis, all stored as 8 (a multiple of
    # 8 capped at bs), so one bucket of 9 real 8x8 tiles.
    plan = plan_tree(((20, 20),), (False,), 8, 100, k)
    (bucket,) = plan.buckets
    assert (bucket.rows, bucket.cols, bucket.valid_count) == (8, 8, 9)
    assert bucket.stack == {1: 9, 2: 10, 3: 9, 8: 16}[k]
    # a large 50x3 leaf (max_size_dense=10): one strip [50, 3] stored [50, 8]
    plan = plan_tree(((50, 3),), (False,), 8, 10, k)
    (leaf,) = plan.leaves
    assert leaf.layout == LargeLayout(True, False, (), (Part(0, 1, 3),), 8, 1, k)


# ---------------------------------------------------------------------------------------
# the public strategies of `wkron_eqx.testing` keep their promises


@MANY
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(1, 16),
    dims=st.tuples(st.integers(0, 5), st.integers(0, 5)).map(sorted),
    allow_empty=st.booleans(),
)
def test_leaf_shapes_strategy_bounds(data, block_size, dims, allow_empty):
    min_dims, max_dims = dims
    shape = data.draw(
        wkt.leaf_shapes(
            block_size=block_size, min_dims=min_dims, max_dims=max_dims, allow_empty=allow_empty
        )
    )
    max_side = max(3, 5 * block_size // 2)
    assert min_dims <= len(shape) <= max_dims
    assert all(0 <= d <= max_side for d in shape)
    assert allow_empty or 0 not in shape
    if len(shape) > 2:
        assert math.prod(shape) <= max_side**2


@MANY
@hypothesis.given(
    data=st.data(), layers=st.tuples(st.integers(0, 4), st.integers(0, 4)).map(sorted)
)
def test_scanned_shapes_strategy_bounds(data, layers):
    shape = data.draw(wkt.scanned_shapes(block_size=4, min_layers=layers[0], max_layers=layers[1]))
    assert layers[0] <= shape[0] <= layers[1] and len(shape) <= 4


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=st.data(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_param_trees_and_nonfinite_gradients_strategies(data, dtype):
    params, scanned = data.draw(wkt.param_trees(block_size=4, max_leaves=3, dtype=dtype))
    assert list(params) == list(scanned) and 1 <= len(params) <= 3
    for name, x in params.items():
        assert x.dtype == dtype and isinstance(scanned[name], bool)
        assert not scanned[name] or x.ndim >= 1
    hypothesis.assume(any(x.size for x in params.values()))
    poisoned = data.draw(wkt.nonfinite_gradients(params))
    assert list(poisoned) == list(params)
    bad = 0
    for name, x in params.items():
        y = poisoned[name]
        assert y.shape == x.shape and y.dtype == x.dtype
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        finite = np.isfinite(y)
        np.testing.assert_array_equal(y[finite], x[finite])
        bad += int((~finite).sum())
    assert bad >= 1


# ---------------------------------------------------------------------------------------
# Compute groups (buckets merged into padded batched computations)


def _multiply_adds(rows: int, cols: int) -> int:
    """Multiply-adds of one tile's factor update, re-derived: each side applied twice in
    the cheaper order, both statistics, and two factor products per side."""
    left = min(rows**3 + rows**2 * cols, 2 * rows**2 * cols)
    right = min(cols**3 + rows * cols**2, 2 * rows * cols**2)
    return 2 * (left + right) + rows**2 * cols + rows * cols**2 + 2 * (rows**3 + cols**3)


@MANY
@hypothesis.given(
    sides=st.lists(
        st.tuples(st.integers(1, 32), st.integers(1, 32), st.integers(1, 5), st.booleans()),
        min_size=1,
        max_size=10,
        unique_by=lambda s: (s[0], s[1], s[3]),
    ),
    accelerator=st.booleans(),
)
def test_groups_partition_buckets_within_budget(sides, accelerator):
    from wkron_eqx._layout import Bucket, group_buckets

    grouping = wk.Backend.of("gpu" if accelerator else "cpu").grouping
    # Buckets of two classes: whole leaves, and leaves planned by 2 shards over "x".
    buckets = tuple(
        Bucket(8 * r, 8 * c, (), 2 * n, 2 * n, 2, ("x",))
        if by_shard
        else Bucket(8 * r, 8 * c, (), n, n)
        for r, c, n, by_shard in sides
    )
    groups = group_buckets(buckets, grouping)
    members = [m for g in groups for m in g.members]
    assert sorted(m.bucket for m in members) == list(range(len(buckets)))
    padded = 0
    for g in groups:
        assert g.rows <= g.cols
        for m in g.members:
            b = buckets[m.bucket]
            assert (b.shards, b.axes) == (g.shards, g.axes)  # one class per group
            assert m.transposed == (b.rows > b.cols)
            rows, cols = (b.cols, b.rows) if m.transposed else (b.rows, b.cols)
            assert rows <= g.rows and cols <= g.cols
        padded += sum(buckets[m.bucket].stack for m in g.members) * _multiply_adds(g.rows, g.cols)
    exact = sum(b.stack * _multiply_adds(b.rows, b.cols) for b in buckets)
    assert padded <= (1 + grouping.budget) * exact
    # A bucket that is alone in its group is not padded.
    for g in groups:
        if len(g.members) == 1:
            b = buckets[g.members[0].bucket]
            assert (g.rows, g.cols) == (min(b.rows, b.cols), max(b.rows, b.cols))


def test_groups_of_the_benchmark_trees():
    # MLP 784-512-512-10: the 16x256 and 256x16 edge tiles share one computation.
    mlp = plan_tree(((784, 512), (512, 512), (512, 10)), (False,) * 3, 256, 16384, 1)
    assert [(g.rows, g.cols, len(g.members)) for g in mlp.groups] == [(16, 256, 2), (256, 256, 1)]
    # Conv kernels 3-32-64-128-256 and a 256x10 head: eight buckets, three computations.
    shapes = ((3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128), (3, 3, 128, 256), (256, 10))
    conv = plan_tree(shapes, (False,) * 5, 256, 16384, 1)
    assert len(conv.buckets) == 8
    assert sorted((g.rows, g.cols) for g in conv.groups) == [(64, 128), (128, 256), (256, 256)]


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    tree=wkt.param_trees(block_size=8, max_leaves=4),
    max_size_dense=st.integers(4, 40),
    mode=st.sampled_from([None, "one_diag", "all_diag"]),
)
def test_tree_plan_follows_the_factory_arguments(tree, max_size_dense, mode):
    """`tree_plan` takes `quad`'s arguments (those that change no layout too) and plans
    every leaf, in flattening order, by the rules re-derived in `plan_rules.py`."""
    params, scanned = tree
    plan = wk.tree_plan(
        params,
        learning_rate=0.1,
        weight_decay=1e-4,
        scanned_layers=scanned,
        block_size=8,
        max_size_dense=max_size_dense,
        memory_save_mode=mode,
    )
    assert len(plan.leaves) == len(params)
    for name, leaf in zip(sorted(params), plan.leaves, strict=True):
        shape = params[name].shape
        batch, layer = (shape[0], shape[1:]) if scanned[name] else (1, shape)
        merged = expected_merge(layer)
        kind, diag_left, diag_right = expected_kind(merged, max_size_dense, mode)
        assert (leaf.scanned, leaf.batch, leaf.shape) == (scanned[name], batch, layer)
        assert (leaf.merged, leaf.block_size, leaf.kind) == (merged, 8, kind)
        if kind != LeafKind.ONE_D:
            assert (leaf.layout.diag_left, leaf.layout.diag_right) == (diag_left, diag_right)
