"""Tile / untile leaves, padded identities and validity masks.

A dense leaf viewed as `[B, m, n]` is cut into tile groups (see `_layout.TileGroup`):
every group is one `[tiles, rows, cols]` stack, zero-padded up to its bucket's stored
size. A large leaf is cut into strips along its dense side. All functions are pure and
shape-static.

A leaf planned shard by shard (`_layout.ShardGrid`) is viewed as `[shards * B, m, n]`,
shard-major (`leaf_view`); its stacks hold one run of entries per shard, one after the
other, and the shard-aware helpers below (`join_runs`, `run_slice`, `take_runs`,
`per_shard`) work on those runs without moving an entry from one shard's run to
another's, so that a stack sharded over the shards' mesh axes stays where it is.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from ._layout import DenseLayout, LargeLayout, LeafPlan, Part


def leaf_view(x: Shaped[Array, "..."], plan: LeafPlan) -> Shaped[Array, "S ..."]:
    """The leaf as the step sees it: `[batch, *merged]`, or for a leaf planned by shard
    `[shards * batch, *merged]`, each shard's layers together (shards row-major)."""
    if plan.grid is None:
        return x.reshape((plan.batch,) + plan.merged)
    counts = plan.grid.counts
    split = x.reshape(tuple(n for pair in zip(counts, plan.local_shape) for n in pair))
    rank = len(counts)
    split = split.transpose(tuple(range(0, 2 * rank, 2)) + tuple(range(1, 2 * rank, 2)))
    return split.reshape((plan.shards * plan.batch,) + plan.merged)


def leaf_unview(v: Shaped[Array, "S ..."], plan: LeafPlan) -> Shaped[Array, "..."]:
    """Inverse of `leaf_view`: the leaf in its own shape."""
    shape = plan.leaf_shape
    if plan.grid is None:
        return v.reshape(shape)
    counts = plan.grid.counts
    rank = len(counts)
    split = v.reshape(counts + plan.local_shape)
    order = [axis for d in range(rank) for axis in (d, rank + d)]
    return split.transpose(order).reshape(shape)


def _runs(x, shards: int):
    return x.reshape((shards, x.shape[0] // shards) + x.shape[1:])


def _flat(x):
    return x.reshape((-1,) + x.shape[2:])


def join_runs(xs: list[Array], shards: int) -> Array:
    """Stacks of `shards` runs each joined run by run: run `s` of the result is run `s`
    of each in turn."""
    if len(xs) == 1:
        return xs[0]
    if shards == 1:
        return jnp.concatenate(xs, axis=0)
    return _flat(jnp.concatenate([_runs(x, shards) for x in xs], axis=1))


def join_static(xs: list[np.ndarray], shards: int) -> np.ndarray:
    """`join_runs` of static data (NumPy arrays)."""
    return np.concatenate([_runs(x, shards) for x in xs], axis=1).reshape(-1)


def run_slice(x: Shaped[Array, "n ..."], shards: int, start: int, size: int):
    """Entries `start : start + size` of every run of `x` (the inverse of `join_runs`)."""
    if start == 0 and size * shards == x.shape[0]:
        return x  # every entry: no op to trace
    if shards == 1:
        return x[start : start + size]
    return _flat(_runs(x, shards)[:, start : start + size])


def take_runs(x: Shaped[Array, "n ..."], shards: int, start: Int[Array, ""], size: int):
    """`run_slice` at a runtime `start` (a `WhiteKronState.slots` entry)."""
    if shards == 1:
        return take(x, start, size)
    runs = jax.lax.dynamic_slice_in_dim(
        _runs(x, shards), start, size, 1, allow_negative_indices=False
    )
    return _flat(runs)


def pad_runs(x: Shaped[Array, "n ..."], shards: int, run: int) -> Shaped[Array, "m ..."]:
    """Zero entries appended to every run of `x`, up to `run` entries each."""
    if shards == 1 or run * shards == x.shape[0]:
        return pad_stack(x, run * shards)
    return _flat(pad_stack(_runs(x, shards).swapaxes(0, 1), run).swapaxes(0, 1))


def per_shard(fn: Callable, shards: int) -> Callable:
    """`fn` (of one shard's arrays) applied to each of `shards` runs of its arguments
    (every array's leading axis), the results' runs joined again in the same order."""
    if shards == 1:
        return fn

    def run(*args):
        out = jax.vmap(fn)(*jax.tree.map(lambda x: _runs(x, shards), args))
        return jax.tree.map(_flat, out)

    return run


def take(x: Shaped[Array, "n ..."], start: Int[Array, ""], size: int) -> Shaped[Array, "m ..."]:
    """`x[start : start + size]` for a runtime `start` (a `WhiteKronState.slots` entry),
    known to be in range: no wrapping of negative indices to trace."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, allow_negative_indices=False)


def materialised(x: Float[Array, " n"]) -> Float[Array, " n"]:
    """`x` itself, written once into a buffer.

    XLA's CPU backend copies a cheap elementwise producer into every consumer fusion.
    For a flat array whose parts are cut out at each leaf's offset (the 1-D leaves'
    noisy input, new factors and output), that is one copy of the whole producer per
    leaf, and on a tree of many 1-D leaves those copies dominate the program. A
    dynamic-update-slice is never fused into its consumers, so writing `x` through
    one materialises it exactly once.
    """
    buffer = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
    return jax.lax.dynamic_update_slice(buffer, x, (0,))[: x.shape[0]]


def zero_pad(x: Shaped[Array, "..."], pads: list[tuple[int, int]]) -> Shaped[Array, "..."]:
    """`jnp.pad` with zeros at the ends (`pads` as `(before, after)` per axis), as one
    `lax.pad`: this runs once per leaf, so it is kept to one traced operation."""
    if all(p == (0, 0) for p in pads):
        return x
    return jax.lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) for lo, hi in pads])


def pad_stack(x: Shaped[Array, "n ..."], stack: int) -> Shaped[Array, "m ..."]:
    """Append zero entries along the leading (stack) axis up to `stack` entries."""
    extra = stack - x.shape[0]
    if extra == 0:
        return x
    return zero_pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def _pad_tail(x: Shaped[Array, "t r c"], rows: int, cols: int) -> Shaped[Array, "t R C"]:
    return zero_pad(x, [(0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])])


def _take_group(
    x: Shaped[Array, "B m n"], row_part: Part, col_part: Part
) -> Shaped[Array, "tiles r c"]:
    batch = x.shape[0]
    rows, cols = row_part.count * row_part.size, col_part.count * col_part.size
    block = x[
        :,
        row_part.start : row_part.start + rows,
        col_part.start : col_part.start + cols,
    ]
    if row_part.count == col_part.count == 1:
        return block  # one tile per layer: already `[tiles, r, c]`
    block = block.reshape(batch, row_part.count, row_part.size, col_part.count, col_part.size)
    block = block.transpose(0, 1, 3, 2, 4)
    return block.reshape(-1, row_part.size, col_part.size)


def _put_group(
    tiles: Shaped[Array, "tiles R C"], batch: int, row_part: Part, col_part: Part
) -> Shaped[Array, "B r c"]:
    tiles = tiles[:, : row_part.size, : col_part.size]
    if row_part.count == col_part.count == 1:
        return tiles  # one tile per layer: already `[B, r, c]`
    tiles = tiles.reshape(batch, row_part.count, col_part.count, row_part.size, col_part.size)
    tiles = tiles.transpose(0, 1, 3, 2, 4)
    return tiles.reshape(batch, row_part.count * row_part.size, col_part.count * col_part.size)


def tile(
    x: Shaped[Array, "B m n"], plan: LeafPlan[DenseLayout]
) -> tuple[Shaped[Array, "_ _ _"], ...]:
    """Cut a dense leaf into its tile groups, each zero-padded to its bucket's size.

    **Arguments:**

    - `x`: the leaf viewed as `[B, m, n]`.
    - `plan`: its `LeafPlan` (kind `DENSE`).

    **Returns:**

    One `[batch * row tiles * col tiles, rows, cols]` array per tile group, in the
    order of its layout's `groups`.
    """
    groups = plan.layout.groups
    return tuple(_pad_tail(_take_group(x, g.row_part, g.col_part), *g.bucket) for g in groups)


def untile(
    tiles: tuple[Shaped[Array, "_ _ _"], ...], plan: LeafPlan[DenseLayout]
) -> Shaped[Array, "B m n"]:
    """Inverse of `tile`: drop the padding and put the tiles back as `[B, m, n]`."""
    rows, cols = plan.merged
    layout = plan.layout
    if not layout.groups:
        dtype = tiles[0].dtype if tiles else jnp.float32
        return jnp.zeros((plan.batch, rows, cols), dtype)
    blocks = iter(
        _put_group(t, plan.batch, g.row_part, g.col_part)
        for t, g in zip(tiles, layout.groups, strict=True)
    )
    band_rows = [
        jnp.concatenate([next(blocks) for _ in layout.col_parts], axis=2) for _ in layout.row_parts
    ]
    return jnp.concatenate(band_rows, axis=1)


def _strips_along_cols(x: Shaped[Array, "B m n"], parts: tuple[Part, ...], side: int):
    batch, rows, _ = x.shape
    pieces = [jnp.zeros((0, rows, side), x.dtype)]  # a 0-size side has no parts
    for part in parts:
        block = x[:, :, part.start : part.start + part.count * part.size]
        block = block.reshape(batch, rows, part.count, part.size).transpose(0, 2, 1, 3)
        block = block.reshape(-1, rows, part.size)
        pieces.append(zero_pad(block, [(0, 0), (0, 0), (0, side - part.size)]))
    return jnp.concatenate(pieces, axis=0)


def _join_along_cols(strips: Shaped[Array, "S m W"], batch: int, parts: tuple[Part, ...]):
    rows = strips.shape[1]
    blocks, offset = [jnp.zeros((batch, rows, 0), strips.dtype)], 0
    for part in parts:
        block = strips[offset : offset + batch * part.count, :, : part.size]
        offset += batch * part.count
        block = block.reshape(batch, part.count, rows, part.size).transpose(0, 2, 1, 3)
        blocks.append(block.reshape(batch, rows, part.count * part.size))
    return jnp.concatenate(blocks, axis=2)


def cut_strips(
    x: Shaped[Array, "B m n"], plan: LeafPlan[LargeLayout]
) -> Shaped[Array, "stack r c"]:
    """Cut a large leaf into strips along its dense side, padded up to its layout's
    `stack`.

    With a diagonal left side the strips are `[m, strip_side]`, with a diagonal
    right side `[strip_side, n]`; with both sides diagonal each layer is one strip.
    """
    layout = plan.layout
    if layout.diag_left and layout.diag_right:
        strips = x
    elif layout.diag_left:
        strips = _strips_along_cols(x, layout.col_parts, layout.strip_side)
    else:
        xt = jnp.swapaxes(x, 1, 2)
        strips = jnp.swapaxes(_strips_along_cols(xt, layout.row_parts, layout.strip_side), 1, 2)
    return pad_stack(strips, layout.stack)


def join_strips(
    strips: Shaped[Array, "stack r c"], plan: LeafPlan[LargeLayout]
) -> Shaped[Array, "B m n"]:
    """Inverse of `cut_strips`: drop dummies and padding, return `[B, m, n]`."""
    layout = plan.layout
    strips = strips[: layout.strips]
    if layout.diag_left and layout.diag_right:
        return strips
    if layout.diag_left:
        return _join_along_cols(strips, plan.batch, layout.col_parts)
    joined = _join_along_cols(jnp.swapaxes(strips, 1, 2), plan.batch, layout.row_parts)
    return jnp.swapaxes(joined, 1, 2)


def side_sizes(parts: tuple[Part, ...], batch: int, stack: int) -> tuple[int, ...]:
    """Valid side of each entry of a stack built from `parts` (0 for pipeline dummies)."""
    sizes = tuple(p.size for p in parts for _ in range(batch * p.count))
    return sizes + (0,) * (stack - len(sizes))


def valid_prefix(valid: Int[Array, " n"], side: int) -> Bool[Array, "n side"]:
    """True on the first `valid[i]` of `side` positions of entry `i`."""
    return jnp.arange(side)[None, :] < valid[:, None]


def padded_ones(valid: Int[Array, " n"], side: int, scale: float, dtype) -> Float[Array, "n side"]:
    """A diagonal factor: `scale` on the first `valid[i]` positions, exactly 0 elsewhere."""
    return valid_prefix(valid, side).astype(dtype) * jnp.asarray(scale, dtype)


def padded_identity(
    valid: Int[Array, " n"], side: int, scale: float, dtype
) -> Float[Array, "n side side"]:
    """`scale * I` on the first `valid[i]` rows/cols of entry `i`, exactly 0 elsewhere."""
    diagonal = padded_ones(valid, side, scale, dtype)
    return diagonal[:, :, None] * jnp.eye(side, dtype=dtype)[None]


def validity_mask(
    valid_rows: Int[Array, " n"], valid_cols: Int[Array, " n"], rows: int, cols: int
) -> Bool[Array, "n rows cols"]:
    """True exactly on the real (unpadded) elements of each `[rows, cols]` entry."""
    return valid_prefix(valid_rows, rows)[:, :, None] & valid_prefix(valid_cols, cols)[:, None, :]
