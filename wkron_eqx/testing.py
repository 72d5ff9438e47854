"""Hypothesis strategies for testing code that uses `wkron_eqx`.

`hypothesis` is an optional (test) dependency, so this module is not imported by
`import wkron_eqx`; import it explicitly:

```python
import hypothesis
import wkron_eqx as wk
import wkron_eqx.testing as wkt


@hypothesis.given(tree=wkt.param_trees(block_size=8), k=wkt.pipeline_sizes())
def test_init(tree, k):
    params, scanned = tree
    wk.quad(block_size=8, scanned_layers=scanned, pipeline_axis_size=k).init(params)
```

Sizes are small by default (every side at most `2.5 * block_size`), so that a jitted
property stays cheap with small block sizes (4 to 16), while the edge cases of the tile
plan are drawn often: 0-size dims, 0-d scalars, `1 x n` and `n x 1` matrices, sides just
below, at and just above a multiple of `block_size`, and 3-D/4-D kernels.
"""

import math
from typing import Any, no_type_check

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree


__all__ = [
    "block_sizes",
    "leaf_shapes",
    "nonfinite_gradients",
    "param_trees",
    "pipeline_sizes",
    "scanned_shapes",
]

_NONFINITE = (math.nan, math.inf, -math.inf)

# Every function here is `@no_type_check`: these functions run while Hypothesis draws an
# example, and beartype (switched on for this package by jaxtyping's import hook) samples
# container items with the global `random` module, which Hypothesis refuses in a strategy.


@no_type_check
def block_sizes(min_value: int = 4, max_value: int = 16) -> st.SearchStrategy[int]:
    """Small block sizes, including ones that are not a multiple of 8.

    **Arguments:**

    - `min_value`, `max_value`: the inclusive range.

    **Returns:**

    A strategy of ints in `[min_value, max_value]`.
    """
    if not 1 <= min_value <= max_value:
        raise ValueError(f"Need 1 <= `min_value` <= `max_value`, got {min_value}, {max_value}.")
    return st.integers(min_value, max_value)


@no_type_check
def pipeline_sizes(max_value: int = 8) -> st.SearchStrategy[int]:
    """Values of `pipeline_axis_size`.

    **Arguments:**

    - `max_value`: the largest size drawn.

    **Returns:**

    A strategy of ints in `[1, max_value]`.
    """
    if max_value < 1:
        raise ValueError(f"`max_value` must be an int >= 1, got {max_value!r}.")
    return st.integers(1, max_value)


@no_type_check
def _edge_sides(block_size: int, max_side: int) -> list[int]:
    """1, 2 and the sides just below, at and just above multiples of `block_size`."""
    edges = {1, 2}
    for multiple in range(block_size, max_side + 2, block_size):
        edges.update((multiple - 1, multiple, multiple + 1))
    return sorted(e for e in edges if 1 <= e <= max_side)


@no_type_check
def _sides(block_size: int, max_side: int) -> st.SearchStrategy[int]:
    edges = _edge_sides(block_size, max_side)
    return st.one_of(st.sampled_from(edges), st.integers(1, max_side))


@st.composite
@no_type_check
def _kernel(
    draw: st.DrawFn, ndim: int, block_size: int, max_side: int, max_elements: int
) -> tuple[int, ...]:
    # Sides are drawn against a budget of elements (a 4-D kernel of four sides of
    # `2.5 * block_size` would be far from small), then put in a random order.
    sides: list[int] = []
    for _ in range(ndim):
        cap = max(1, min(max_side, max_elements // math.prod(sides)))
        sides.append(draw(_sides(block_size, cap)))
    return tuple(draw(st.permutations(sides)))


@st.composite
@no_type_check
def leaf_shapes(
    draw: st.DrawFn,
    block_size: int = 8,
    *,
    min_dims: int = 0,
    max_dims: int = 4,
    max_side: int | None = None,
    max_elements: int | None = None,
    allow_empty: bool = True,
) -> tuple[int, ...]:
    """Shapes of parameter leaves, biased towards the edge cases of the tile plan.

    The number of dims is drawn first; a 2-D shape is a row `(1, n)`, a column `(n, 1)`
    or a matrix `(m, n)`; 3-D/4-D kernels are drawn against a budget of elements. Sides
    are drawn from `1`, `2`, `k * block_size - 1`, `k * block_size`, `k * block_size + 1`
    and uniformly; with `allow_empty`, about one shape in eight has a side set to 0.

    **Arguments:**

    - `block_size`: the block size the edge cases are placed around.
    - `min_dims`, `max_dims`: the range of the number of dims (`0 <= min_dims <= max_dims`).
    - `max_side`: the largest side; defaults to `2.5 * block_size` (at least 3).
    - `max_elements`: the most elements of a 3-D/4-D kernel; defaults to `max_side ** 2`.
    - `allow_empty`: whether a side may be 0.

    **Returns:**

    A strategy of shape tuples.
    """
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"Need 0 <= `min_dims` <= `max_dims`, got {min_dims}, {max_dims}.")
    if block_size < 1:
        raise ValueError(f"`block_size` must be an int >= 1, got {block_size!r}.")
    if max_side is None:
        max_side = max(3, (5 * block_size) // 2)
    if max_side < 1:
        raise ValueError(f"`max_side` must be an int >= 1, got {max_side!r}.")
    if max_elements is None:
        max_elements = max_side**2
    side = _sides(block_size, max_side)
    ndim = draw(st.sampled_from(range(min_dims, max_dims + 1)))
    if ndim == 2:
        form = draw(st.sampled_from(["row", "column", "matrix", "matrix"]))
        shape = {
            "row": lambda: (1, draw(side)),
            "column": lambda: (draw(side), 1),
            "matrix": lambda: (draw(side), draw(side)),
        }[form]()
    elif ndim > 2:
        shape = draw(_kernel(ndim, block_size, max_side, max_elements))
    else:
        shape = tuple(draw(side) for _ in range(ndim))
    if allow_empty and ndim and draw(st.integers(0, 7)) == 0:
        empty = draw(st.integers(0, ndim - 1))
        shape = shape[:empty] + (0,) + shape[empty + 1 :]
    return shape


@no_type_check
def scanned_shapes(
    block_size: int = 8,
    *,
    min_layers: int = 1,
    max_layers: int = 3,
    max_dims: int = 3,
    **kwargs: Any,
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes of scanned leaves: a leading stack axis of layers, then a layer's shape.

    **Arguments:**

    - `block_size`: as in `leaf_shapes`.
    - `min_layers`, `max_layers`: the range of the stack size.
    - `max_dims`: the most dims of one layer (the stacked shape has one more).
    - `**kwargs`: passed on to `leaf_shapes` for the layer's shape.

    **Returns:**

    A strategy of shape tuples `(layers, *layer_shape)`.
    """
    if not 0 <= min_layers <= max_layers:
        raise ValueError(f"Need 0 <= `min_layers` <= `max_layers`, got {min_layers}, {max_layers}.")
    layer = leaf_shapes(block_size, max_dims=max_dims, **kwargs)
    return st.builds(lambda n, s: (n,) + s, st.integers(min_layers, max_layers), layer)


@no_type_check
def _array(shape: tuple[int, ...], seed: int, dtype: Any) -> Array:
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values, dtype)


@st.composite
@no_type_check
def param_trees(
    draw: st.DrawFn,
    block_size: int = 8,
    *,
    min_leaves: int = 1,
    max_leaves: int = 4,
    allow_scanned: bool = True,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> tuple[dict[str, Array], dict[str, bool]]:
    """Params trees (flat dicts of arrays) and a matching `scanned_layers` tree.

    Each leaf is drawn from `leaf_shapes` or, when `allow_scanned`, from `scanned_shapes`
    (then its flag is `True`); values are standard normal.

    **Arguments:**

    - `block_size`: as in `leaf_shapes`.
    - `min_leaves`, `max_leaves`: the range of the number of leaves.
    - `allow_scanned`: whether scanned leaves may be drawn.
    - `dtype`: the dtype of every leaf.
    - `**kwargs`: passed on to `leaf_shapes` (for a scanned leaf, for its layer's shape).

    **Returns:**

    A strategy of `(params, scanned_layers)`: `params` maps `"w0"`, `"w1"`, ... to arrays,
    `scanned_layers` maps the same keys to bools.
    """
    count = draw(st.integers(min_leaves, max_leaves))
    params, scanned = {}, {}
    for i in range(count):
        is_scanned = draw(st.booleans()) if allow_scanned else False
        if is_scanned:
            shape = draw(scanned_shapes(block_size, **kwargs))
        else:
            shape = draw(leaf_shapes(block_size, **kwargs))
        seed = draw(st.integers(0, 2**32 - 1))
        params[f"w{i}"], scanned[f"w{i}"] = _array(shape, seed, dtype), is_scanned
    return params, scanned


@st.composite
@no_type_check
def nonfinite_gradients(
    draw: st.DrawFn, grads: PyTree[Array], *, max_positions: int = 3
) -> PyTree[Array]:
    """Copies of `grads` with NaN, `+inf` or `-inf` put at drawn positions.

    At least one non-empty leaf is poisoned, at between 1 and `max_positions` positions,
    each with a drawn value; the other leaves and positions keep their values and dtypes.
    When no leaf has an element, there is nothing to poison and the draw is rejected (as
    `hypothesis.assume(False)` would).

    **Arguments:**

    - `grads`: a pytree of floating arrays.
    - `max_positions`: the most poisoned positions per poisoned leaf.

    **Returns:**

    A strategy of pytrees with the structure, shapes and dtypes of `grads`.
    """
    leaves, treedef = jax.tree.flatten(grads)
    candidates = [i for i, leaf in enumerate(leaves) if np.size(leaf)]
    if not candidates:
        draw(st.nothing())
    poisoned = draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True))
    out = list(leaves)
    for i in poisoned:
        values = np.array(leaves[i], copy=True)
        flat = values.reshape(-1)
        positions = draw(
            st.lists(
                st.integers(0, flat.size - 1),
                min_size=1,
                max_size=max(1, max_positions),
                unique=True,
            )
        )
        for position in positions:
            flat[position] = draw(st.sampled_from(_NONFINITE))
        out[i] = jnp.asarray(values, dtype=jnp.asarray(leaves[i]).dtype)
    return jax.tree.unflatten(treedef, out)
