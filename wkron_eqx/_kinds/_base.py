"""`AbstractKind`: what every leaf kind gives the step, and `StateParts`, the parts of a
`WhiteKronState` that the kinds own."""

import abc
from typing import Any, Generic, NamedTuple, TypeVar

import equinox as eqx
from jaxtyping import Array, Float, Int

from .._config import Config
from .._custom_types import AxisNames
from .._kron import Grams, StepContext
from .._layout import LeafKind, LeafPlan, TreePlan
from .._state import DenseState, LeafState


class FactorStack(NamedTuple):
    """One stack of factor pairs as `preconditioner_stats` reads it (`Qr`/`Lr` are
    `None` for a 1-D leaf)."""

    Ql: Array
    Qr: Array | None
    Ll: Array
    Lr: Array | None
    valid_rows: Array
    valid_cols: Array

    def sliced(self, start: int, stop: int) -> "FactorStack":
        return FactorStack(*(None if x is None else x[start:stop] for x in self))  # pyright: ignore


class StateParts(NamedTuple):
    """The factor-holding parts of a state, as the kinds read and write them: the dense
    buckets, one `LeafState` per leaf, and (with `cache_preconditioner`) the stored
    sides of each bucket and of each leaf (`None` where it has none)."""

    dense: tuple[DenseState, ...]
    leaves: tuple[LeafState, ...]
    dense_cache: tuple[Grams, ...] | None
    leaf_cache: tuple[Grams | None, ...] | None


_State = TypeVar("_State")
_Cache = TypeVar("_Cache")


class AbstractKind(eqx.Module, Generic[_State, _Cache]):
    """A kind of leaf (dense tiles, large strips, 1-D vectors): how its factors are
    initialised, kept in the state, and stepped.

    Each kind owns the type of its leaves' static plan (`layout`, the `LeafPlan.layout`
    that `_layout` classifies a leaf into), of its part of the state (`_State`: the
    dense kind's buckets, a leaf kind's `LeafState`s by leaf index) and of its stored
    sides (`_Cache`); the step loops over the kinds without naming one.
    """

    kind: eqx.AbstractClassVar[LeafKind]
    # The type of its leaves' `LeafPlan.layout` (`_layout.DenseLayout`, ...): the static
    # facts of a leaf that only this kind reads.
    layout: eqx.AbstractClassVar[type]
    # Whether the arrays of this kind's `LeafState`s are stacks, sharded over the
    # pipeline axes (the dense kind's stacks are its buckets).
    stacked_leaf_states: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def positions(self, plan: TreePlan) -> dict[int, tuple[int, ...]]:
        """Per leaf of this kind, where it sits in the kind's shared arrays (after its
        index, in `WhiteKronState.slots`); a leaf left out has no positions."""

    @abc.abstractmethod
    def factor_stacks(self, parts: StateParts, plan: TreePlan, index: int) -> list[FactorStack]:
        """The real entries (no pipeline dummies) of leaf `index`'s factors."""

    @abc.abstractmethod
    def init(self, plan: TreePlan, config: Config) -> _State:
        """The initial factors of every leaf of this kind in `plan`."""

    @abc.abstractmethod
    def init_cache(self, state: _State, config: Config, symmetric: bool) -> _Cache | None:
        """The sides `P = Q^T Q` of `state`'s factors (`cache_preconditioner`), or
        `None` when the kind stores none; `symmetric` as `AbstractRule.symmetric`."""

    @abc.abstractmethod
    def get(self, parts: StateParts, indices: list[int]) -> tuple[_State, _Cache | None]:
        """This kind's state and cache out of `parts`, for the leaves `indices`."""

    @abc.abstractmethod
    def put(self, parts: StateParts, state: _State, cache: _Cache | None) -> StateParts:
        """`parts` with this kind's state and cache replaced (the inverse of `get`)."""

    @abc.abstractmethod
    def update(
        self,
        ctx: StepContext,
        inputs: dict[int, Float[Array, "B ..."]],
        state: _State,
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
        - `state`, `cache`: as `get` returns them.
        - `slots`: leaf index -> its `WhiteKronState.slots` entry, where the leaf sits in
          the kind's shared arrays.
        - `plan`: the static layout; `refresh`: whether the factors update (static);
          `axis_name`: the mesh axes the stacks are sharded over.

        **Returns:**

        `(outputs, state, sum_sq, cache)`: the outputs keyed like `inputs`; the new
        state and cache; each leaf's sum of squared outputs (0 for other kinds' leaves),
        which the RMS clip needs.
        """


class AbstractLeafKind(AbstractKind[dict[int, LeafState], Any]):
    """A kind whose every leaf has its own `LeafState` (and its own sides, if any)."""

    @abc.abstractmethod
    def real_entries(self, plan: LeafPlan) -> int:
        """How many entries of a leaf's stacked factors are real (not dummies)."""

    def factor_stacks(self, parts: StateParts, plan: TreePlan, index: int) -> list[FactorStack]:
        s = parts.leaves[index]
        assert s.Ql is not None and s.Ll is not None
        assert s.valid_rows is not None and s.valid_cols is not None
        stack = FactorStack(s.Ql, s.Qr, s.Ll, s.Lr, s.valid_rows, s.valid_cols)
        return [stack.sliced(0, self.real_entries(plan.leaves[index]))]

    def get(
        self, parts: StateParts, indices: list[int]
    ) -> tuple[dict[int, LeafState], dict[int, Any] | None]:
        state = {i: parts.leaves[i] for i in indices}
        cache = None if parts.leaf_cache is None else {i: parts.leaf_cache[i] for i in indices}
        return state, cache

    def put(
        self, parts: StateParts, state: dict[int, LeafState], cache: dict[int, Any] | None
    ) -> StateParts:
        leaves = list(parts.leaves)
        for i, s in state.items():
            leaves[i] = s
        leaf_cache = parts.leaf_cache
        if leaf_cache is not None and cache is not None:
            leaf_cache = list(leaf_cache)
            for i, g in cache.items():
                leaf_cache[i] = g
            leaf_cache = tuple(leaf_cache)
        return parts._replace(leaves=tuple(leaves), leaf_cache=leaf_cache)
