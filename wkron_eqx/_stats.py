"""`preconditioner_stats`: a look inside the preconditioner, usable inside `jit`."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._blocking import valid_prefix
from ._kinds import FactorStack, kind_of
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


def _valid_mask(Q: Array, valid: Int[Array, " s"]) -> Bool[Array, "s *side"]:
    """True on each factor's valid part: a prefix of a diagonal factor, the leading
    square block of a dense one."""
    prefix = valid_prefix(valid, Q.shape[-1])
    return prefix if Q.ndim == 2 else prefix[:, :, None] & prefix[:, None, :]


def _rms_singular_value(Q: Array, valid: Int[Array, " s"]) -> Float[Array, " s"]:
    """`||Q||_F / sqrt(n)` on each factor's `n x n` valid block: the root mean square of
    its singular values (of its entries, for a diagonal factor). One elementwise pass."""
    q = Q.astype(jnp.float32)
    square_sum = jnp.sum(jnp.where(_valid_mask(Q, valid), q * q, 0), axis=tuple(range(1, q.ndim)))
    return jnp.sqrt(square_sum / jnp.maximum(valid, 1).astype(jnp.float32))


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


def _condition(Q: Array, valid: Int[Array, " s"]) -> Float[Array, " s"]:
    return _diag_condition(Q, valid) if Q.ndim == 2 else _dense_condition(Q, valid)


def _side_stats(
    side: str, Q: Array, L: Array, valid: Int[Array, " s"], condition_numbers: bool
) -> dict[str, Array]:
    stats = {f"L{side[0]}": L, f"rms_{side}": _rms_singular_value(Q, valid)}
    if condition_numbers:
        stats[f"cond_{side}"] = _condition(Q, valid)
    return stats


def _leaf_stats(kind: int, stacks: list[FactorStack], condition_numbers: bool) -> dict[str, Array]:
    """Statistics of one leaf from its stacks (all with or all without a right factor)."""
    real = jnp.zeros((), jnp.float32)
    stored, tiles = 0, 0
    per_tile: list[dict[str, Array]] = []
    for s in stacks:
        tiles += s.valid_rows.shape[0]
        real = real + jnp.sum((s.valid_rows * s.valid_cols).astype(jnp.float32))
        cols = 1 if s.Qr is None else s.Qr.shape[-1]
        stored += s.valid_rows.shape[0] * s.Ql.shape[-1] * cols
        stats = _side_stats("left", s.Ql, s.Ll, s.valid_rows, condition_numbers)
        if s.Qr is not None and s.Lr is not None:
            stats |= _side_stats("right", s.Qr, s.Lr, s.valid_cols, condition_numbers)
        per_tile.append(stats)
    if per_tile:
        out = {k: jnp.concatenate([p[k] for p in per_tile]) for k in per_tile[0]}
    else:  # a leaf with no entries (a zero-size dim): its keys, empty
        keys = ["Ll", "rms_left", "Lr", "rms_right"]
        keys += ["cond_left", "cond_right"] if condition_numbers else []
        out = {k: jnp.zeros((0,), jnp.float32) for k in keys}
    out["kind"] = jnp.array(kind, jnp.int32)
    out["tiles"] = jnp.array(tiles, jnp.int32)
    out["padding_fraction"] = jnp.maximum(1 - real / max(stored, 1), 0) if stored else real
    return out


def _factor_stacks(state: WhiteKronState, index: int) -> list[FactorStack]:
    """Leaf `index`'s factors, from its kind's part of `state`."""
    kind = kind_of(state.plan.tree.leaves[index].kind)
    return kind.factor_stacks(getattr(state, kind.name), state.plan.tree, index)


def preconditioner_stats(state: Any, *, condition_numbers: bool = False) -> Any:
    """Per-leaf statistics of the preconditioner, as a plain pytree of arrays.

    By default every statistic is one elementwise pass over the factors (no
    decomposition), cheap enough to return from every jitted training step.
    `condition_numbers=True` adds each factor's condition number, at the price of an
    SVD of every dense factor. On a 2-core CPU (`benchmarks/results/stats_cost.md`:
    `quad` on an MLP 784-512-512-10 in float32, 14 dense tiles of up to `256 x 256`)
    the jitted step took 34 ms alone, 34 ms with the default statistics inside it
    (0.9 ms by themselves), and 136 ms (4x) with the condition numbers (fastest of 30
    calls; with other load on the machine, up to 1.2 s).

    **Arguments:**

    - `state`: the state of `scale_by_quad`/`scale_by_skew`, or of `quad`/`skew` (also
      inside `optax.chain`, `inject_hyperparams`, `MultiSteps`, ...).
    - `condition_numbers`: a Python bool (static under `jit`); whether to add
      `cond_left`/`cond_right`.

    **Returns:**

    A tree with the structure of the params; each leaf is a dict with

    - `kind` (0 dense, 1 large, 2 one-d) and `tiles` (tiles, strips or layers);
    - `padding_fraction`: the share of the stored tile area that is padding;
    - `Ll`/`Lr`: the Lipschitz estimates, one per tile (0 until the factors first
      update);
    - `rms_left`/`rms_right`: the root mean square of each factor's singular values
      on its valid part, `||Q||_F / sqrt(n)` for an `n x n` block (for a diagonal
      factor, the RMS of its `n` entries); `1` for the identity;
    - with `condition_numbers=True`, `cond_left`/`cond_right`: each factor's condition
      number on its valid part (singular-value ratio for a dense factor, max/min
      ratio of the absolute entries for a diagonal one).

    Arrays with one value per tile have shape `[tiles]`. 1-D leaves have no right
    factor (no `Lr`, `rms_right`, `cond_right`). Pipeline dummies are left out.
    """
    if not isinstance(condition_numbers, bool | np.bool_):
        raise ValueError(
            f"`condition_numbers` must be a Python bool, got {condition_numbers!r}; under "
            "`jax.jit`, mark it static (`static_argnames='condition_numbers'`)."
        )
    state = _find_state(state)
    plan = state.plan.tree
    out = [
        _leaf_stats(
            int(leaf.kind),
            _factor_stacks(state, i),
            bool(condition_numbers),
        )
        for i, leaf in enumerate(plan.leaves)
    ]
    return jax.tree.unflatten(state.plan.treedef, out)
