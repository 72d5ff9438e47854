"""`preconditioner_stats`: a look inside the preconditioner, usable inside `jit`."""

import sys
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._layout import LeafKind, bucket_tiles, leaf_plan
from ._state import DenseState, LeafState, WhiteKronState


def _find_state(state: Any) -> WhiteKronState:
    if isinstance(state, WhiteKronState):
        return state
    if isinstance(state, tuple):
        for part in state:
            try:
                return _find_state(part)
            except TypeError:
                pass
    raise TypeError(
        "`preconditioner_stats` needs the state of `scale_by_quad`/`scale_by_skew`/"
        f"`quad`/`skew` (a WhiteKronState, or a tuple holding one), got {type(state)}."
    )


def _dense_condition(Q: Float[Array, "s n n"], valid: Int[Array, " s"]) -> Float[Array, " s"]:
    """Ratio of the largest to the smallest singular value on each factor's valid block."""
    sv = jnp.linalg.svd(Q.astype(jnp.float32), compute_uv=False)  # descending
    # Padding adds exact zero singular values at the end; skip them.
    smallest = jnp.take_along_axis(sv, jnp.maximum(valid - 1, 0)[:, None], axis=1)[:, 0]
    return sv[:, 0] / smallest


def _diag_condition(q: Float[Array, "s n"], valid: Int[Array, " s"]) -> Float[Array, " s"]:
    mask = jnp.arange(q.shape[1])[None, :] < valid[:, None]
    a = jnp.abs(q.astype(jnp.float32))
    return jnp.max(jnp.where(mask, a, 0), axis=1) / jnp.min(jnp.where(mask, a, jnp.inf), axis=1)


def _condition(Q: Array, valid: Array) -> Array:
    return _diag_condition(Q, valid) if Q.ndim == 2 else _dense_condition(Q, valid)


def _stats(Ql, Qr, Ll, Lr, vr, vc, rows: int, cols: int, kind: int) -> dict[str, Array]:
    real = (vr * vc).astype(jnp.float32)
    stored = jnp.full(real.shape, rows * cols, jnp.float32)
    out = {
        "kind": jnp.array(kind, jnp.int32),
        "tiles": jnp.array(vr.shape[0], jnp.int32),
        "padding_fraction": jnp.maximum(1 - jnp.sum(real) / jnp.maximum(jnp.sum(stored), 1), 0),
        "Ll": Ll,
        "cond_left": _condition(Ql, vr),
    }
    if Qr is not None:
        out["Lr"] = Lr
        out["cond_right"] = _condition(Qr, vc)
    return out


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
    is_leaf_state = lambda x: isinstance(x, LeafState)
    leaf_states, treedef = jax.tree.flatten(state.leaves, is_leaf=is_leaf_state)
    plans = [
        leaf_plan(
            ((s.B,) if s.scanned else ()) + tuple(s.shape or ()),
            bool(s.scanned),
            int(s.block_size or 1),
            sys.maxsize if s.kind == LeafKind.DENSE else 0,
            1,
        )
        for s in leaf_states
    ]
    dense_indices = [i for i, s in enumerate(leaf_states) if s.kind == LeafKind.DENSE]
    buckets = bucket_tiles(tuple(plans[i] for i in dense_indices), 1)
    # where each dense leaf's tiles sit: (bucket index, start, count) per tile group
    slices: dict[int, list[tuple[int, int, int]]] = {i: [] for i in dense_indices}
    for b, bucket in enumerate(buckets):
        start = 0
        for seg in bucket.segments:
            slices[dense_indices[seg.leaf]].append((b, start, seg.count))
            start += seg.count
    out = []
    for i, s in enumerate(leaf_states):
        if s.kind == LeafKind.DENSE:
            parts = []
            for b, start, count in slices[i]:
                d: DenseState = state.dense[b]
                sl = slice(start, start + count)
                parts.append(
                    (d.Ql[sl], d.Qr[sl], d.Ll[sl], d.Lr[sl], d.valid_rows[sl], d.valid_cols[sl])
                )
            out.append(_dense_leaf_stats(parts, state.dense, slices[i]))
        else:
            real = plans[i].strips if s.kind == LeafKind.LARGE else s.B
            pick = lambda x: None if x is None else x[:real]
            assert s.Ql is not None and s.valid_rows is not None and s.valid_cols is not None
            rows = s.Ql.shape[-1]
            cols = 1 if s.Qr is None else s.Qr.shape[-1]
            out.append(
                _stats(
                    pick(s.Ql),
                    pick(s.Qr),
                    pick(s.Ll),
                    pick(s.Lr),
                    pick(s.valid_rows),
                    pick(s.valid_cols),
                    rows,
                    cols,
                    int(s.kind),
                )  # fmt: skip
            )
    return treedef.unflatten(out)


def _dense_leaf_stats(parts, dense: tuple[DenseState, ...], slices) -> dict[str, Array]:
    if not parts:
        empty = jnp.zeros((0,), jnp.float32)
        return {
            "kind": jnp.array(int(LeafKind.DENSE), jnp.int32),
            "tiles": jnp.array(0, jnp.int32),
            "padding_fraction": jnp.array(0.0, jnp.float32),
            "Ll": empty,
            "cond_left": empty,
            "Lr": empty,
            "cond_right": empty,
        }
    groups = [
        _stats(*p, dense[b].Ql.shape[-1], dense[b].Qr.shape[-1], int(LeafKind.DENSE))
        for p, (b, _, _) in zip(parts, slices, strict=True)
    ]
    real = sum(jnp.sum((p[4] * p[5]).astype(jnp.float32)) for p in parts)
    stored = sum(
        p[4].shape[0] * dense[b].Ql.shape[-1] * dense[b].Qr.shape[-1]
        for p, (b, _, _) in zip(parts, slices, strict=True)
    )
    cat = lambda k: jnp.concatenate([g[k] for g in groups])
    return {
        "kind": jnp.array(int(LeafKind.DENSE), jnp.int32),
        "tiles": jnp.array(sum(p[4].shape[0] for p in parts), jnp.int32),
        "padding_fraction": 1 - real / stored,
        "Ll": cat("Ll"),
        "cond_left": cat("cond_left"),
        "Lr": cat("Lr"),
        "cond_right": cat("cond_right"),
    }
