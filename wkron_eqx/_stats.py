"""`preconditioner_stats`: a look inside the preconditioner, usable inside `jit`."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._blocking import valid_prefix
from ._kinds import FactorStack, StateParts, kind_of
from ._state import WhiteKronState


def _find_state(state: Any) -> WhiteKronState:
    """The one `WhiteKronState` anywhere in `state` (chains, wrappers, partitions)."""
    is_state = lambda x: isinstance(x, WhiteKronState)
    found = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
    if len(found) == 1:
        return found[0]
    raise TypeError(
        "`preconditioner_stats` needs an optimizer state that holds exactly one state of "
        "`scale_by_quad`/`scale_by_skew`/`quad`/`skew` (a WhiteKronState); found "
        f"{len(found)} in {type(state)}. Pass the part of the state you want."
    )


def _dense_condition(Q: Float[Array, "s n n"], valid: Int[Array, " s"]) -> Float[Array, " s"]:
    """Ratio of the largest to the smallest singular value on each factor's valid block."""
    sv = jnp.linalg.svd(Q.astype(jnp.float32), compute_uv=False)  # descending
    # Padding adds exact zero singular values at the end; skip them.
    smallest = jnp.take_along_axis(sv, jnp.maximum(valid - 1, 0)[:, None], axis=1)[:, 0]
    return sv[:, 0] / smallest


def _diag_condition(q: Float[Array, "s n"], valid: Int[Array, " s"]) -> Float[Array, " s"]:
    mask = valid_prefix(valid, q.shape[1])
    a = jnp.abs(q.astype(jnp.float32))
    return jnp.max(jnp.where(mask, a, 0), axis=1) / jnp.min(jnp.where(mask, a, jnp.inf), axis=1)


def _condition(Q: Array, valid: Array) -> Array:
    return _diag_condition(Q, valid) if Q.ndim == 2 else _dense_condition(Q, valid)


def _leaf_stats(kind: int, stacks: list[FactorStack]) -> dict[str, Array]:
    """Statistics of one leaf from its stacks (all with or all without a right factor)."""
    has_right = not stacks or stacks[0].Qr is not None
    real = jnp.zeros((), jnp.float32)
    stored, tiles = 0, 0
    out: dict[str, list[Array]] = {"Ll": [], "cond_left": [], "Lr": [], "cond_right": []}
    for s in stacks:
        tiles += s.valid_rows.shape[0]
        real = real + jnp.sum((s.valid_rows * s.valid_cols).astype(jnp.float32))
        cols = 1 if s.Qr is None else s.Qr.shape[-1]
        stored += s.valid_rows.shape[0] * s.Ql.shape[-1] * cols
        out["Ll"].append(s.Ll)
        out["cond_left"].append(_condition(s.Ql, s.valid_rows))
        if s.Qr is not None and s.Lr is not None:
            out["Lr"].append(s.Lr)
            out["cond_right"].append(_condition(s.Qr, s.valid_cols))
    keys = ("Ll", "cond_left", "Lr", "cond_right") if has_right else ("Ll", "cond_left")
    stats = {k: jnp.concatenate(out[k]) if out[k] else jnp.zeros((0,), jnp.float32) for k in keys}
    stats["kind"] = jnp.array(kind, jnp.int32)
    stats["tiles"] = jnp.array(tiles, jnp.int32)
    stats["padding_fraction"] = jnp.maximum(1 - real / max(stored, 1), 0) if stored else real
    return stats


def preconditioner_stats(state: Any) -> Any:
    """Per-leaf statistics of the preconditioner, as a plain pytree of arrays.

    **Arguments:**

    - `state`: the state of `scale_by_quad`/`scale_by_skew`, or of `quad`/`skew`.

    **Returns:**

    A tree with the structure of the params; each leaf is a dict with
    `kind` (0 dense, 1 large, 2 one-d), `tiles` (tiles, strips or layers), `padding_fraction`
    (the share of stored tile area that is padding), `Ll`/`Lr` (Lipschitz estimates per
    tile) and `cond_left`/`cond_right` (condition number of each factor on its valid part:
    singular-value ratio for a dense factor, max/min ratio for a diagonal one). 1-D leaves
    have no right factor. Pipeline dummies are left out. Works inside `jit`.
    """
    state = _find_state(state)
    plan = state.plan.tree
    parts = StateParts(state.dense, state.leaves, None, None)
    out = [
        _leaf_stats(int(leaf.kind), kind_of(leaf.kind).factor_stacks(parts, plan, i))
        for i, leaf in enumerate(plan.leaves)
    ]
    return jax.tree.unflatten(state.plan.treedef, out)
