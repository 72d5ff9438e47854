"""Checks of what reaches `init` and `update`, with errors that name the leaf and the fix.

All of them run at trace time, on static shapes, dtypes and tree structure.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._custom_types import Unchecked
from ._state import WhiteKronState


_FILTER_HINT = (
    "Give the optimizer the floating-point arrays only: with Equinox, "
    "`eqx.filter(model, eqx.is_inexact_array)` for `init` and `eqx.filter_grad` / "
    "`eqx.filter_value_and_grad` for the gradients; with Flax NNX, "
    "`nnx.Optimizer(model, tx, wrt=nnx.Param)`."
)


def unwrapped(path: tuple) -> tuple:
    """`path` without a trailing `.value`: a variable wrapper (Flax NNX's `Param`)
    around the array, present in the params and absent from the gradients, so the same
    leaf either way."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(unwrapped(path))


def path_names(tree: Any) -> tuple[str, ...]:
    """The path of every leaf (`jax.tree_util.keystr`, without a trailing `.value`), in
    flattening order."""
    return tuple(_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def check_params(params: Unchecked) -> tuple[list[Any], Any, tuple[str, ...]]:
    """Flatten `params`, refusing any leaf that is not a floating-point array.

    **Returns:**

    `(leaves, treedef, path names)`.
    """
    leaves, treedef = jax.tree.flatten(params)
    names = path_names(params)
    for name, leaf in zip(names, leaves, strict=True):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, float):
            continue
        if dtype is None or not hasattr(leaf, "shape"):
            raise TypeError(
                f"The params leaf at {name} is a {type(leaf).__name__}, not an array. "
                + _FILTER_HINT
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"The params leaf at {name} has dtype {np.dtype(dtype).name}; the optimizer "
                "preconditions real floating-point arrays only. " + _FILTER_HINT
            )
    return leaves, treedef, names


def _structure_mismatch(updates: Unchecked, state: WhiteKronState) -> ValueError:
    """An error naming the leaves that one tree has and the other lacks."""
    want = {
        name: leaf.leaf_shape
        for name, leaf in zip(state.plan.paths, state.plan.tree.leaves, strict=True)
    }
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    have = {_name(p): tuple(jnp.shape(x)) for p, x in flat}
    details = []
    if missing := [f"{k} (shape {v})" for k, v in want.items() if k not in have]:
        details.append("it lacks " + ", ".join(missing))
    if extra := [f"{k} (shape {v})" for k, v in have.items() if k not in want]:
        details.append("the state has no leaf " + ", ".join(extra))
    if not details:
        details.append(f"its leaves are ordered {list(have)}, not {list(want)}")
    return ValueError(
        "The updates tree does not have the structure of the params the optimizer state "
        f"was initialised with: {'; '.join(details)}."
    )


def check_updates(updates: Unchecked, state: WhiteKronState) -> tuple[list[Array], Any]:
    """Flatten `updates`, refusing a tree that does not match the state's params.

    **Returns:**

    `(leaves, treedef)` of `updates`.

    **Raises:**

    `ValueError` naming the leaves for another structure or shape, `TypeError` for a
    leaf that is not floating point (`float0` included).
    """
    leaves, treedef = jax.tree.flatten(updates)
    plans = state.plan.tree.leaves
    names = path_names(updates)
    if names != state.plan.paths:
        raise _structure_mismatch(updates, state)
    for name, g, plan in zip(names, leaves, plans, strict=True):
        dtype = getattr(g, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            kind = (
                "float0 (the gradient of a non-differentiable leaf)"
                if (dtype == jax.dtypes.float0)
                else (np.dtype(dtype).name if dtype is not None else type(g).__name__)
            )
            raise TypeError(
                f"The update at {name} has dtype {kind}; a floating dtype is required. "
                + _FILTER_HINT
            )
        expected = plan.leaf_shape
        if tuple(g.shape) != expected:
            raise ValueError(
                f"The update at {name} has shape {tuple(g.shape)}, but the optimizer state "
                f"was initialised for shape {expected}."
            )
    return leaves, treedef


def _key_name(key: Any) -> Any:
    """A path entry as a plain name: a dict key, an attribute or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _plain_path(path: tuple) -> tuple:
    return tuple(_key_name(k) for k in unwrapped(path))


_NNX_RECIPE = (
    "With Flax NNX, a nested dict keyed like the model's attributes works, e.g. "
    '`{"blocks": True, "head": False}`; so does a tree of the params\' own type: '
    "`flags = jax.tree.map(lambda _: False, nnx.state(model, nnx.Param))`, then set "
    '`flags["blocks"] = jax.tree.map(lambda _: True, flags["blocks"])`.'
)


def _flags_by_path(scanned_layers: Any, params: Unchecked) -> list[Any]:
    """Broadcast a prefix tree of another container type (a plain dict against a Flax
    NNX `State`, or against an Equinox module's attributes) by matching key paths."""
    prefix = {_plain_path(p): f for p, f in jax.tree_util.tree_flatten_with_path(scanned_layers)[0]}
    used, flags = set(), []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _plain_path(path)
        owner = next((names[:n] for n in range(len(names), -1, -1) if names[:n] in prefix), None)
        if owner is None:
            raise ValueError(
                "`scanned_layers` must be None, a bool, or a (prefix) tree of bools covering "
                f"every params leaf; nothing in it covers {jax.tree_util.keystr(unwrapped(path))}"
                ". " + _NNX_RECIPE
            )
        used.add(owner)
        flags.append(prefix[owner])
    if unused := [p for p in prefix if p not in used]:
        unused = ", ".join("".join(f"[{k!r}]" for k in p) for p in unused)
        raise ValueError(
            f"`scanned_layers` has entries that name no params leaf: {unused}. " + _NNX_RECIPE
        )
    return flags


def scanned_flags(scanned_layers: Any, params: Unchecked) -> tuple[bool, ...]:
    """Broadcast `scanned_layers` (None, a bool, a full tree or a prefix tree of bools)
    to one flag per leaf of `params`, refusing anything that does not fit.

    A prefix tree of the params' own structure is broadcast as `jax.tree.broadcast`
    does; one of other containers (a nested dict against a Flax NNX `State` or an
    Equinox module) is matched by key path. A flag is a Python `bool` or a NumPy
    `np.bool_`; an int or a JAX array is refused (it is too easy to pass a traced or
    non-boolean value by mistake).
    """
    leaves = jax.tree.leaves(params)
    if scanned_layers is None:
        return (False,) * len(leaves)
    try:
        flags = jax.tree.leaves(jax.tree.broadcast(scanned_layers, params))
    except (ValueError, TypeError):
        # Not JAX's wording (it names its internals): ours names the leaf and the fix.
        flags = _flags_by_path(scanned_layers, params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if len(flags) != len(leaves):
        raise ValueError(
            "`scanned_layers` must be a bool or a tree of bools whose structure is a prefix "
            f"of the params tree; it broadcasts to {len(flags)} flags for {len(leaves)} leaves."
        )
    out = []
    for name, flag, leaf in zip(names, flags, leaves, strict=True):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(
                f"`scanned_layers` at {name} must be a bool (`True`/`False`), got {flag!r}."
            )
        if flag and jnp.ndim(leaf) == 0:
            raise ValueError(
                f"`scanned_layers` flags the leaf {name} as scanned, but it has no leading axis "
                "(shape ())."
            )
        out.append(bool(flag))
    return tuple(out)
