"""The optimizer state: `DenseState` (a bucket of dense tiles), `LeafState` (one leaf),
`Plan` (the static layout) and the top-level `WhiteKronState`."""

import base64
import dataclasses
import json
from typing import Any, NamedTuple, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._backend import Backend
from ._kron import StackCache
from ._layout import LeafKind, LeafPlan, TreePlan


def _encode(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray):
        array = np.asarray(value)
        return {
            "__array__": base64.b64encode(array.tobytes()).decode("ascii"),
            "dtype": jnp.dtype(array.dtype).name,
            "shape": list(array.shape),
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__array__" in value:
        raw = base64.b64decode(value["__array__"])
        array = np.frombuffer(raw, dtype=jnp.dtype(value["dtype"])).reshape(value["shape"])
        return jnp.asarray(array)
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    return value


_T = TypeVar("_T", bound="_Serialisable")


class _Serialisable(eqx.Module):
    """`replace`, `to_dict`/`from_dict` and `to_json`/`from_json`, exact for every dtype."""

    def replace(self: _T, **kwargs) -> _T:
        """A copy with the given fields replaced (the original is untouched)."""
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a `dict` (arrays stay arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
        """Inverse of `to_dict`."""
        return cls(**data)

    def to_json(self, **kwargs) -> str:
        """A JSON string holding every field; arrays are stored bit-exactly (base64)."""
        return json.dumps({k: _encode(v) for k, v in self.to_dict().items()}, **kwargs)

    @classmethod
    def from_json(cls: type[_T], json_str: str) -> _T:
        """Inverse of `to_json`."""
        return cls.from_dict({k: _decode(v) for k, v in json.loads(json_str).items()})


class DenseState(_Serialisable):
    """One batched stack of dense tiles, all of stored size `rows x cols`.

    Every tile has its own left factor `Ql` (`rows x rows`), right factor `Qr`
    (`cols x cols`) and Lipschitz estimates `Ll`, `Lr`. Rows/cols beyond
    `valid_rows`/`valid_cols` are padding and stay exactly 0. Pipeline dummies (no
    valid part at all, `valid_rows == 0`) close the stack: past `valid_count` in a
    bucket of whole leaves, and at the end of each shard's run (`Bucket.run` entries,
    `valid_count / shards` of them real) in a bucket of leaves planned by shard.

    **Fields:**

    - `Ql`, `Qr`: the factors, in the preconditioner dtype.
    - `Ll`, `Lr`: float32 Lipschitz estimates per tile.
    - `valid_rows`, `valid_cols`: int32 valid size of each tile.
    - `valid_count`: the number of real tiles (static).
    - `block_size`: the configured block size (static).
    """

    Ql: Float[Array, "tiles rows rows"]
    Qr: Float[Array, "tiles cols cols"]
    Ll: Float[Array, " tiles"]
    Lr: Float[Array, " tiles"]
    valid_rows: Int[Array, " tiles"]
    valid_cols: Int[Array, " tiles"]
    valid_count: int = eqx.field(static=True)
    block_size: int = eqx.field(static=True)


class LeafState(_Serialisable):
    """The state of one `LARGE_PATH` or `ONE_D_PATH` leaf: its factors, and the
    reference's static description of the leaf. (A `DENSE_PATH` leaf has none in the
    state: its factors live in the `DenseState` buckets; `WhiteKronState.leaf_tree`
    describes it on demand.)

    **Fields:**

    - `kind`: `DENSE_PATH`, `LARGE_PATH` or `ONE_D_PATH`.
    - `scanned`: 1 when the leading axis is a stack of `B` layers, else 0.
    - `B`: the stack size (1 when not scanned).
    - `shape`: the shape without the scanned axis; `merged` its 1-D/2-D view.
    - `nr`, `nc`: tile (or strip) counts along rows and cols.
    - `block_size`: the configured block size.
    - `diag_left`, `diag_right`: whether a side is diagonal.
    - `stack`: for a large leaf, entries in its stacked factors (strips plus pipeline
      dummies); for a dense leaf, its real tiles; for a 1-D leaf, `B`.
    - `Ql`, `Qr`, `Ll`, `Lr`, `valid_rows`, `valid_cols`: the leaf's own factors
      (`Qr`/`Lr` are `None` for a 1-D leaf; all are `None` in a dense leaf's
      description). A diagonal factor is `[stack, length]`, a dense one
      `[stack, side, side]`.
    """

    kind: int = eqx.field(static=True)
    scanned: int = eqx.field(static=True)
    B: int = eqx.field(static=True)
    shape: tuple[int, ...] | None = eqx.field(static=True, default=None)
    merged: tuple[int, ...] | None = eqx.field(static=True, default=None)
    nr: int | None = eqx.field(static=True, default=None)
    nc: int | None = eqx.field(static=True, default=None)
    block_size: int | None = eqx.field(static=True, default=None)
    diag_left: bool | None = eqx.field(static=True, default=None)
    diag_right: bool | None = eqx.field(static=True, default=None)
    stack: int | None = eqx.field(static=True, default=None)
    Ql: Float[Array, "stack *left"] | None = None
    Qr: Float[Array, "stack *right"] | None = None
    Ll: Float[Array, " stack"] | None = None
    Lr: Float[Array, " stack"] | None = None
    valid_rows: Int[Array, " stack"] | None = None
    valid_cols: Int[Array, " stack"] | None = None

    @classmethod
    def from_plan(cls, plan: LeafPlan, **arrays: Array) -> "LeafState":
        """The `LeafState` of a planned leaf: its static fields, the one place they are
        written, read off `plan` and its kind's layout; its factors (none for a dense
        leaf's description) from `arrays`. The step follows the plan, not these."""
        layout = plan.layout
        return cls(
            kind=int(plan.kind),
            scanned=int(plan.scanned),
            B=plan.batch,
            shape=plan.shape,
            merged=plan.merged,
            nr=layout.nr,
            nc=layout.nc,
            block_size=plan.block_size,
            diag_left=layout.diag_left,
            diag_right=layout.diag_right,
            stack=layout.stack,
            **arrays,
        )


class Plan(eqx.Module):
    """The static plan a state was initialised with (no arrays: it is part of the
    tree structure, so `jit` sees it as static data). `update` follows it instead of
    planning again, and `preconditioner_stats` reads the layout from it."""

    tree: TreePlan = eqx.field(static=True)
    paths: tuple[str, ...] = eqx.field(static=True)  # `keystr` of each params leaf
    treedef: Any = eqx.field(static=True)  # the params' tree structure
    backend: Backend = eqx.field(static=True)  # the platform choices the step follows


class PreconditionerCache(eqx.Module):
    """The stored sides `Pl = Ql^T Ql`, `Pr = Qr^T Qr` of every stacked factor pair
    (`cache_preconditioner`), refreshed whenever the factors are; a step that only
    applies the factors computes `Pl G Pr` from them. One field per kind that stores
    sides, named as its part of the state.

    **Fields:**

    - `dense`: one `StackCache` per `DenseState` bucket, shaped like its `Ql` and `Qr`.
    - `large`: one `StackCache` per large leaf, as `WhiteKronState.large` (a diagonal side
      is `q^2`, `[stack, length]`).

    (1-D leaves store none: their `q^2 g` is one elementwise pass either way.) Both are
    in the factors' storage dtype and sharded like them.
    """

    dense: tuple[StackCache, ...]
    large: tuple[StackCache, ...]


class WhiteKronState(NamedTuple):
    """State of `scale_by_quad` / `scale_by_skew`.

    **Fields:**

    - `count`: steps taken (int32); a step skipped for a non-finite gradient does not count.
    - `mu`: the momentum buffer (same tree as params, in the preconditioner dtype),
      or `None` when `b1 == 0`.
    - `dense`: the dense kind's part, one `DenseState` per bucket of equally sized
      dense tiles (of every dense leaf).
    - `large`: the large kind's part, a `LeafState` per large leaf, in
      `jax.tree.leaves(params)` order (flat tuples, so that the state holds no
      container of the params' library).
    - `one_d`: the 1-D kind's part, a `LeafState` per 1-D leaf, in the same order.
    - `update_counter`: steps since the factors were last updated
      (`preconditioner_update_probability`).
    - `skipped_steps`: steps skipped because the gradient (or the step) was not finite.
    - `factor_updates`: steps on which the factors were updated.
    - `slots`: per leaf, an int32 vector of where it sits in the step's shared arrays
      (`_kinds.leaf_slots`). They never change; they are data rather than constants
      so that XLA compiles one set of kernels per leaf shape, not one per leaf.
    - `plan`: the static layout (`Plan`).
    - `cache`: the stored preconditioner sides (`PreconditionerCache`) with
      `cache_preconditioner` and an update probability below 1; else `None`.
    - `damping_memory`: with `damping > 0`, per leaf (float32), the largest RMS its
      input has had; else `None`.
    - `last_step_skipped`: whether the latest step was skipped (a non-finite gradient
      or step): `quad` / `skew` then skip the rest of their chain too.
    """

    count: Int[Array, ""]
    mu: PyTree[Array] | None
    dense: tuple[DenseState, ...]
    large: tuple[LeafState, ...]
    one_d: tuple[LeafState, ...]
    update_counter: Int[Array, ""]
    skipped_steps: Int[Array, ""]
    factor_updates: Int[Array, ""]
    slots: tuple[Int[Array, " k"], ...]
    plan: Plan
    cache: PreconditionerCache | None = None
    damping_memory: Float[Array, " leaves"] | None = None
    last_step_skipped: Bool[Array, ""] = None  # pyright: ignore  (always set by `init`)

    def leaf_states(self) -> tuple[LeafState, ...]:
        """A `LeafState` per parameter leaf, in `jax.tree.leaves(params)` order: a large
        or 1-D leaf's own state, and for a dense leaf its description
        (`LeafState.from_plan`, no arrays: its factors are in the buckets)."""
        plan = self.plan.tree
        own = dict(zip(plan.of_kind(LeafKind.LARGE), self.large, strict=True))
        own |= dict(zip(plan.of_kind(LeafKind.ONE_D), self.one_d, strict=True))
        return tuple(
            own[i] if i in own else LeafState.from_plan(p) for i, p in enumerate(plan.leaves)
        )

    def leaf_tree(self) -> PyTree[LeafState]:
        """`leaf_states` arranged like the params (`state.leaf_tree()["w"]`)."""
        return jax.tree.unflatten(self.plan.treedef, self.leaf_states())
