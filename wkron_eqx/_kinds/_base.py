"""`AbstractKind`: what every leaf kind gives the step. Each kind owns its part of a
`WhiteKronState` (the field named as the kind) and of its `PreconditionerCache`."""

import abc
from typing import Any, Generic, NamedTuple, TypeVar

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int

from .._blocking import run_slice
from .._config import Config
from .._custom_types import AxisNames
from .._kron import StepContext
from .._layout import LeafKind, LeafPlan, TreePlan
from .._sharding import constrain_stack
from .._state import LeafState


class FactorStack(NamedTuple):
    """One stack of factor pairs as `preconditioner_stats` reads it (`Qr`/`Lr` are
    `None` for a 1-D leaf)."""

    Ql: Array
    Qr: Array | None
    Ll: Array
    Lr: Array | None
    valid_rows: Array
    valid_cols: Array

    def runs(self, shards: int, start: int, count: int) -> "FactorStack":
        """Entries `start : start + count` of each of `shards` runs (`_blocking.run_slice`)."""
        return FactorStack(
            *(None if x is None else run_slice(x, shards, start, count) for x in self)  # pyright: ignore
        )


_State = TypeVar("_State")
_Cache = TypeVar("_Cache")


class AbstractKind(eqx.Module, Generic[_State, _Cache]):
    """A kind of leaf (dense tiles, large strips, 1-D vectors): how its factors are
    initialised, kept in the state, and stepped.

    Each kind owns the type of its leaves' static plan (`layout`, the `LeafPlan.layout`
    that `_layout` classifies a leaf into), its part of the state (`_State`: the field
    `name` of `WhiteKronState`) and its stored sides (`_Cache`: the field `name` of
    `PreconditionerCache`, for a kind that stores any); the step loops over the kinds
    without naming one.
    """

    # Its part's field in `WhiteKronState` (and in `PreconditionerCache`).
    name: eqx.AbstractClassVar[str]
    kind: eqx.AbstractClassVar[LeafKind]
    # The type of its leaves' `LeafPlan.layout` (`_layout.DenseLayout`, ...): the static
    # facts of a leaf that only this kind reads.
    layout: eqx.AbstractClassVar[type]
    # Whether it stores sides with `cache_preconditioner` (a field of
    # `PreconditionerCache`).
    caches: eqx.AbstractClassVar[bool]
    # Whether its part's arrays are stacks, sharded over the pipeline axes.
    stacked: eqx.AbstractClassVar[bool]

    def entry_axes(self, plan: TreePlan, axis_name: AxisNames) -> tuple[AxisNames, ...]:
        """For a `stacked` kind, the mesh axes each entry of its part (and of its cache)
        is sharded over along its leading axis: `axis_name`, or a sharded leaf's own
        (`ShardGrid.stack_axes`)."""
        raise NotImplementedError(f"{type(self).__name__} is not stacked")

    def constrained(self, part: _State, plan: TreePlan, axis_name: AxisNames) -> _State:
        """`part` (or its cache) with every array sharded as the kind's part is: along
        the leading axis over its entry's axes (`entry_axes`) where the kind is
        `stacked`; otherwise as XLA places it. The step applies it once, to the part a
        kind returns; inside a kind's step only the stacks it makes of its inputs are
        constrained."""
        if not self.stacked:
            return part
        entries: Any = part  # (a stacked kind's part is a tuple of entries)
        return tuple(  # pyright: ignore[reportReturnType]
            jax.tree.map(lambda x, names=names: constrain_stack(x, names), entry)
            for entry, names in zip(entries, self.entry_axes(plan, axis_name), strict=True)
        )

    @abc.abstractmethod
    def positions(self, plan: TreePlan) -> dict[int, tuple[int, ...]]:
        """Per leaf of this kind, where it sits in the kind's shared arrays (after its
        index, in `WhiteKronState.slots`); a leaf left out has no positions."""

    @abc.abstractmethod
    def factor_stacks(self, part: _State, plan: TreePlan, index: int) -> list[FactorStack]:
        """The real entries (no pipeline dummies) of leaf `index`'s factors in `part`."""

    @abc.abstractmethod
    def init(self, plan: TreePlan, config: Config) -> _State:
        """The initial factors of every leaf of this kind in `plan`: its part."""

    @abc.abstractmethod
    def init_cache(self, part: _State, config: Config, symmetric: bool) -> _Cache:
        """The sides `P = Q^T Q` of `part`'s factors (`cache_preconditioner`; only for a
        kind that `caches`); `symmetric` as `AbstractRule.symmetric`."""

    @abc.abstractmethod
    def update(
        self,
        ctx: StepContext,
        inputs: dict[int, Float[Array, "B ..."]],
        part: _State,
        cache: _Cache | None,
        slots: dict[int, Int[Array, " k"]],
        plan: TreePlan,
        refresh: bool,
        axis_name: AxisNames,
    ) -> tuple[dict[int, Float[Array, "B ..."]], _State, Float[Array, " leaves"], _Cache | None]:
        """Precondition every leaf of this kind; update the factors too when `refresh`.

        **Arguments:**

        - `ctx`: what the step knows beyond the inputs (`StepContext`).
        - `inputs`: leaf index -> the leaf viewed as `[B, m, n]` (`[B, n]` for a 1-D
          leaf), for every non-empty leaf of this kind.
        - `part`, `cache`: this kind's part of the state and of the cache (`None`
          without one).
        - `slots`: leaf index -> its `WhiteKronState.slots` entry, where the leaf sits in
          the kind's shared arrays.
        - `plan`: the static layout; `refresh`: whether the factors update (static);
          `axis_name`: the mesh axes the stacks are sharded over.

        **Returns:**

        `(outputs, part, sum_sq, cache)`: the outputs keyed like `inputs`; the new part
        and cache; each leaf's sum of squared outputs (0 for other kinds' leaves),
        which the RMS clip needs.
        """


class AbstractLeafKind(AbstractKind[tuple[LeafState, ...], Any]):
    """A kind whose every leaf has its own `LeafState` (and its own sides, if any): its
    part is one per leaf of the kind, in leaf order (`TreePlan.of_kind`)."""

    @abc.abstractmethod
    def real_entries(self, plan: LeafPlan) -> int:
        """How many entries of a leaf's stacked factors are real (not dummies)."""

    def by_leaf(self, part: tuple, plan: TreePlan) -> dict[int, Any]:
        """`part` (or this kind's part of the cache) keyed by leaf index."""
        return dict(zip(plan.of_kind(self.kind), part, strict=True))

    def in_order(self, by_leaf: dict[int, Any], plan: TreePlan) -> tuple:
        """The inverse of `by_leaf`."""
        return tuple(by_leaf[i] for i in plan.of_kind(self.kind))

    def factor_stacks(
        self, part: tuple[LeafState, ...], plan: TreePlan, index: int
    ) -> list[FactorStack]:
        s = self.by_leaf(part, plan)[index]
        assert s.Ql is not None and s.Ll is not None
        assert s.valid_rows is not None and s.valid_cols is not None
        stack = FactorStack(s.Ql, s.Qr, s.Ll, s.Lr, s.valid_rows, s.valid_cols)
        leaf = plan.leaves[index]
        return [stack.runs(leaf.shards, 0, self.real_entries(leaf))]
