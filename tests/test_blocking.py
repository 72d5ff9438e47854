"""Tiling round trips, inert padding, padded identities, validity masks and the initial
state (`_blocking.py`, `init`), on arbitrary shapes. Every new shape compiles, so the
jitted properties draw few examples."""

import collections
import functools
import math
import random

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk
import wkron_eqx.testing as wkt
from wkron_eqx._blocking import (
    cut_strips,
    join_strips,
    padded_identity,
    side_sizes,
    tile,
    untile,
    validity_mask,
)
from wkron_eqx._layout import LeafKind, leaf_plan

from .plan_rules import expected_kind, expected_merge, expected_sides, expected_stored


FEW = hypothesis.settings(max_examples=8, deadline=None)


@functools.partial(jax.jit, static_argnums=1)
def _tile_roundtrip(x, plan):
    tiles = tile(x, plan)
    return tiles, untile(tiles, plan)


# one compilation per example instead of one per primitive
_padded_identity = jax.jit(padded_identity, static_argnums=(1, 2, 3))
_validity_mask = jax.jit(validity_mask, static_argnums=(2, 3))


@functools.partial(jax.jit, static_argnums=1)
def _strip_roundtrip(x, plan):
    strips = cut_strips(x, plan)
    return strips, join_strips(strips, plan)


def _distinct_values(shape) -> np.ndarray:
    """1, 2, 3, ... (all nonzero, exact in float32): a value tells where it came from."""
    return np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)


def _locate(x: np.ndarray, piece: np.ndarray, block_size: int) -> tuple[int, int, int]:
    """Where the valid (nonzero, top-left) part of `piece` sits in `x` (`[B, m, n]`), as
    (layer, row, col) of its first element; asserts it is exactly that block of `x`, that
    everything outside it is 0, and that it starts on a tile boundary."""
    rows = int(np.count_nonzero(piece[:, 0])) if piece.shape[1] else 0
    cols = int(np.count_nonzero(piece[0])) if piece.shape[0] else 0
    assert rows and cols, "every real tile has a nonzero valid block"
    layer, row, col = np.unravel_index(int(piece[0, 0]) - 1, x.shape)
    np.testing.assert_array_equal(piece[:rows, :cols], x[layer, row : row + rows, col : col + cols])
    outside = piece.copy()
    outside[:rows, :cols] = 0
    assert not outside.any(), "padding of a tile must be exactly 0"
    assert row % block_size == 0 and col % block_size == 0
    return int(layer), int(row), int(col)


@st.composite
def _leaves(draw, kind):
    """(scanned shape [B, *layer], plan arguments) of a leaf of `kind` (DENSE or LARGE).

    The plan itself is built in the test: under the runtime type checker, package functions
    sample container items with `random`, which Hypothesis refuses inside a strategy."""
    block_size = draw(wkt.block_sizes(4, 16))
    k = draw(wkt.pipeline_sizes())
    shape = draw(wkt.scanned_shapes(block_size=block_size, min_layers=0, max_layers=3, min_dims=2))
    merged = expected_merge(shape[1:])
    hypothesis.assume(len(merged) == 2)
    if kind == LeafKind.DENSE:
        smallest = max(1, *merged)
        max_size_dense = draw(st.integers(smallest, max(smallest, 3 * block_size)))
    else:
        hypothesis.assume(min(merged) > 0)  # see test_cut_join_strips_of_empty_large_leaf
        max_size_dense = draw(st.integers(1, max(merged) - 1))
    assert expected_kind(merged, max_size_dense)[0] == kind
    return shape, (shape, True, block_size, max_size_dense, k)


# ---------------------------------------------------------------------------------------
# tile / untile


def test_tile_annotations_accept_groups_of_different_sizes():
    # 2 x 10 with block_size 4: groups of 2 tiles [2, 4] and 1 tile [2, 2], stored 4 x 4.
    plan = leaf_plan((2, 10), False, 4, 100, 1)
    x = jnp.ones((1, 2, 10))
    state = random.getstate()
    try:
        for seed in range(8):
            random.seed(seed)
            assert untile(tile(x, plan), plan).shape == (1, 2, 10)
    finally:
        random.setstate(state)


@FEW
@hypothesis.given(leaf=_leaves(LeafKind.DENSE))
def test_tile_untile_is_identity_with_zero_padding(leaf):
    shape, plan = leaf[0], leaf_plan(*leaf[1])
    x = _distinct_values((plan.batch,) + plan.merged)
    tiles, back = _tile_roundtrip(jnp.asarray(x), plan)
    np.testing.assert_array_equal(np.asarray(back), x)

    origins, mask_total = [], 0
    for stack, group in zip(tiles, plan.layout.groups, strict=True):
        stack = np.asarray(stack)
        count = plan.batch * group.row_part.count * group.col_part.count
        assert stack.shape == (count,) + group.bucket
        for piece in stack:
            origins.append(_locate(x, piece, plan.block_size))
        # the mask of the group's valid sizes selects exactly the nonzero elements
        valid_rows = jnp.full(count, group.row_part.size, jnp.int32)
        valid_cols = jnp.full(count, group.col_part.size, jnp.int32)
        mask = np.asarray(_validity_mask(valid_rows, valid_cols, *group.bucket))
        np.testing.assert_array_equal(mask, stack != 0)
        mask_total += int(mask.sum())
    # every tile of every layer exactly once; the masks select exactly the leaf
    rows, cols = plan.merged
    assert sorted(origins) == [
        (b, i, j)
        for b in range(plan.batch)
        for i in range(0, rows, plan.block_size)
        for j in range(0, cols, plan.block_size)
    ]
    assert mask_total == math.prod(shape)


# ---------------------------------------------------------------------------------------
# cut_strips / join_strips


@pytest.mark.parametrize("shape", [(0, 40), (40, 0)])
def test_cut_join_strips_of_empty_large_leaf(shape):
    plan = leaf_plan(shape, False, 4, 10, 1)
    assert plan.kind == LeafKind.LARGE and plan.layout.strips == 0
    x = jnp.zeros((1,) + shape)
    assert join_strips(cut_strips(x, plan), plan).shape == (1,) + shape


@FEW
@hypothesis.given(leaf=_leaves(LeafKind.LARGE))
def test_cut_join_strips_is_identity_with_zero_padding(leaf):
    shape, plan = leaf[0], leaf_plan(*leaf[1])
    rows, cols = plan.merged
    x = _distinct_values((plan.batch, rows, cols))
    strips, back = _strip_roundtrip(jnp.asarray(x), plan)
    np.testing.assert_array_equal(np.asarray(back), x)
    strips = np.asarray(strips)

    side = plan.layout.strip_side
    stored = (rows if plan.layout.diag_left else side, cols if plan.layout.diag_right else side)
    assert strips.shape == (plan.layout.stack,) + stored
    assert not strips[plan.layout.strips :].any(), "pipeline dummies must be exactly 0"
    origins = sorted(_locate(x, piece, plan.block_size) for piece in strips[: plan.layout.strips])
    row_starts = range(0, rows, plan.block_size) if not plan.layout.diag_left else [0]
    col_starts = range(0, cols, plan.block_size) if not plan.layout.diag_right else [0]
    assert origins == [(b, i, j) for b in range(plan.batch) for i in row_starts for j in col_starts]

    # the valid sizes the factors are built from select exactly the nonzero elements
    whole_rows = [rows] * plan.layout.strips + [0] * (plan.layout.stack - plan.layout.strips)
    whole_cols = [cols] * plan.layout.strips + [0] * (plan.layout.stack - plan.layout.strips)
    if plan.layout.diag_left and plan.layout.diag_right:
        valid_rows, valid_cols = whole_rows, whole_cols
    elif plan.layout.diag_left:
        valid_rows, valid_cols = (
            whole_rows,
            side_sizes(plan.layout.col_parts, plan.batch, plan.layout.stack),
        )
    else:
        valid_rows, valid_cols = (
            side_sizes(plan.layout.row_parts, plan.batch, plan.layout.stack),
            whole_cols,
        )
    mask = _validity_mask(
        jnp.asarray(valid_rows, jnp.int32), jnp.asarray(valid_cols, jnp.int32), *stored
    )
    np.testing.assert_array_equal(np.asarray(mask), strips != 0)
    assert int(np.asarray(mask).sum()) == math.prod(shape)


# ---------------------------------------------------------------------------------------
# padded identities and validity masks

_DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])
_SCALES = st.sampled_from([1.0, 0.5, 3.0, 1e-3])


@FEW
@hypothesis.given(data=st.data(), side=st.integers(0, 20), n=st.integers(0, 4))
def test_padded_identity(data, side, n):
    valid = data.draw(st.lists(st.integers(0, side), min_size=n, max_size=n))
    dtype, scale = data.draw(_DTYPES), data.draw(_SCALES)
    out = _padded_identity(jnp.asarray(valid, jnp.int32), side, scale, dtype)
    assert out.shape == (n, side, side) and out.dtype == dtype
    expected = np.zeros((n, side, side), np.float32)
    for i, v in enumerate(valid):
        expected[i, range(v), range(v)] = float(jnp.asarray(scale, dtype))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected)


@FEW
@hypothesis.given(
    data=st.data(), rows=st.integers(0, 20), cols=st.integers(0, 20), n=st.integers(0, 4)
)
def test_validity_mask(data, rows, cols, n):
    valid_rows = data.draw(st.lists(st.integers(0, rows), min_size=n, max_size=n))
    valid_cols = data.draw(st.lists(st.integers(0, cols), min_size=n, max_size=n))
    mask = np.asarray(
        _validity_mask(
            jnp.asarray(valid_rows, jnp.int32), jnp.asarray(valid_cols, jnp.int32), rows, cols
        )
    )
    assert mask.shape == (n, rows, cols) and mask.dtype == np.bool_
    expected = np.zeros((n, rows, cols), bool)
    for i, (r, c) in enumerate(zip(valid_rows, valid_cols, strict=True)):
        expected[i, :r, :c] = True
    np.testing.assert_array_equal(mask, expected)
    assert int(mask.sum()) == sum(r * c for r, c in zip(valid_rows, valid_cols, strict=True))


# ---------------------------------------------------------------------------------------
# the initial state


def _expected_dense_tiles(params, scanned, block_size, max_size_dense):
    """Counter of (valid rows, valid cols) of every real dense tile ."""
    tiles = collections.Counter()
    for name, x in params.items():
        batch, layer = (x.shape[0], x.shape[1:]) if scanned[name] else (1, x.shape)
        merged = expected_merge(layer)
        if expected_kind(merged, max_size_dense)[0] == LeafKind.DENSE:
            for r in expected_sides(merged[0], block_size):
                for c in expected_sides(merged[1], block_size):
                    tiles[(r, c)] += batch
    return tiles


def _assert_padded_identity(q: np.ndarray, valid: np.ndarray, scale: float):
    """Each `q[i]` is `scale * I` on its first `valid[i]` rows/cols and exactly 0 elsewhere."""
    assert q.ndim == 3 and q.shape[0] == len(valid) and q.shape[1] == q.shape[2]
    expected = np.zeros(q.shape, np.float32)
    for i, v in enumerate(valid):
        expected[i, range(v), range(v)] = scale
    np.testing.assert_array_equal(q.astype(np.float32), expected)


def _assert_padded_ones(q: np.ndarray, valid: np.ndarray, scale: float):
    """Each diagonal `q[i]` is `scale` on its first `valid[i]` entries, exactly 0 after."""
    assert q.ndim == 2 and q.shape[0] == len(valid)
    expected = (np.arange(q.shape[-1])[None, :] < valid[:, None]) * np.float32(scale)
    np.testing.assert_array_equal(q.astype(np.float32), expected)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    data=st.data(),
    block_size=wkt.block_sizes(4, 16),
    k=wkt.pipeline_sizes(),
    dtype=_DTYPES,
    scale=_SCALES,
)
def test_initial_state_padding_and_counts(data, block_size, k, dtype, scale):
    params, scanned = data.draw(wkt.param_trees(block_size=block_size, max_leaves=5))
    max_size_dense = data.draw(st.integers(4, 3 * block_size))
    tx = wk.quad(
        block_size=block_size,
        max_size_dense=max_size_dense,
        pipeline_axis_size=k,
        scanned_layers=scanned,
        dtype=dtype,
        preconditioner_init_scale=scale,
    )
    state = tx.init(params)[0]
    assert isinstance(state, wk.WhiteKronState)
    scale_in_dtype = float(jnp.asarray(scale, dtype))
    assert int(state.count) == 0 and int(state.skipped_steps) == 0

    # dense buckets: padded identities, pipeline dummies, every real tile once
    real_tiles = collections.Counter()
    for bucket in state.dense:
        vr, vc = np.asarray(bucket.valid_rows), np.asarray(bucket.valid_cols)
        stack, count = len(vr), bucket.valid_count
        assert stack % k == 0 and count <= stack < count + k
        assert (vr[:count] > 0).all() and (vc[:count] > 0).all()
        assert not vr[count:].any() and not vc[count:].any()
        assert bucket.Ql.dtype == bucket.Qr.dtype == dtype
        assert bucket.Ll.dtype == bucket.Lr.dtype == jnp.float32
        assert not np.asarray(bucket.Ll).any() and not np.asarray(bucket.Lr).any()
        _assert_padded_identity(np.asarray(bucket.Ql), vr, scale_in_dtype)
        _assert_padded_identity(np.asarray(bucket.Qr), vc, scale_in_dtype)
        # right-sized: the stored sides fit the valid sides of the tiles they hold
        rows, cols = bucket.Ql.shape[-1], bucket.Qr.shape[-1]
        assert rows == max(expected_stored(int(v), block_size) for v in vr[:count])
        assert cols == max(expected_stored(int(v), block_size) for v in vc[:count])
        real_tiles.update(zip(vr[:count].tolist(), vc[:count].tolist()))
    assert real_tiles == _expected_dense_tiles(params, scanned, block_size, max_size_dense)

    # per-leaf factors
    for name, x in params.items():
        leaf = state.leaf_tree()[name]
        batch, layer = (x.shape[0], x.shape[1:]) if scanned[name] else (1, x.shape)
        merged = expected_merge(layer)
        kind, diag_left, diag_right = expected_kind(merged, max_size_dense)
        assert (leaf.kind, leaf.B, leaf.shape, leaf.merged) == (kind, batch, layer, merged)
        if kind == LeafKind.DENSE:
            assert leaf.Ql is None and leaf.Qr is None
        elif kind == LeafKind.ONE_D:
            assert leaf.Ql.shape == (batch,) + merged and leaf.Ql.dtype == dtype
            np.testing.assert_array_equal(np.asarray(leaf.Ql, np.float32), scale_in_dtype)
        else:
            assert (leaf.diag_left, leaf.diag_right) == (diag_left, diag_right)
            vr, vc = np.asarray(leaf.valid_rows), np.asarray(leaf.valid_cols)
            rows, cols = merged
            strips = batch * (
                (1 if diag_left else math.ceil(rows / block_size))
                * (1 if diag_right else math.ceil(cols / block_size))
            )
            assert leaf.stack == len(vr) == len(vc)
            assert leaf.stack % k == 0 and strips <= leaf.stack < strips + k
            assert not vr[strips:].any() and not vc[strips:].any()
            for q, valid, diagonal in ((leaf.Ql, vr, diag_left), (leaf.Qr, vc, diag_right)):
                assert q.dtype == dtype
                check = _assert_padded_ones if diagonal else _assert_padded_identity
                check(np.asarray(q), valid, scale_in_dtype)
            assert int((vr * vc).sum()) == batch * rows * cols
