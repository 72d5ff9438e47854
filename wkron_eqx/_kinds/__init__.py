"""The leaf kinds, each a final `AbstractKind` (see `_base`): dense tiles in shared
buckets, large leaves with diagonal sides and strips, and 1-D leaves, each with its own
part of the state. The step, the state's partition specs and `preconditioner_stats`
loop over `KINDS` without naming one."""

import functools
from typing import Any

import jax
from jax.sharding import PartitionSpec

from .._custom_types import AxisNames
from .._layout import LeafKind, TreePlan
from .._sharding import stacked_spec
from .._state import WhiteKronState
from ._base import AbstractKind as AbstractKind, FactorStack as FactorStack
from .dense import DenseKind
from .large import LargeKind
from .one_d import OneDKind


KINDS: tuple[AbstractKind, ...] = (DenseKind(), LargeKind(), OneDKind())


def kind_of(kind: int | LeafKind) -> AbstractKind:
    """The `AbstractKind` of a `LeafKind`."""
    (found,) = [k for k in KINDS if k.kind == kind]
    return found


def leaf_slots(plan: TreePlan) -> tuple[tuple[int, ...], ...]:
    """Where each leaf sits in the step's shared arrays: `(index, *positions)`.

    `index` is the leaf's place in the tree (its entry in the per-leaf vectors, such
    as the RMS-clip scales); the positions are its kind's (`AbstractKind.positions`):
    for a dense leaf the first entry of each of its tile groups in that group's bucket,
    for a 1-D leaf its first element and first layer among all 1-D leaves; a large or
    empty leaf has none.

    The step reads these as runtime integers (`WhiteKronState.slots`), not as
    constants: XLA compiles one kernel per distinct computation, and a leaf's
    position baked into its slicing would make every leaf's kernels distinct. As
    data, all leaves of one shape share the same kernels, and compile time follows
    the number of distinct shapes rather than the number of leaves.
    """
    positions: dict[int, tuple[int, ...]] = {}
    for kind in KINDS:
        positions.update(kind.positions(plan))
    return tuple((i, *positions.get(i, ())) for i in range(len(plan.leaves)))


def state_specs(state: WhiteKronState, axis_name: AxisNames, mu_specs: Any) -> WhiteKronState:
    """The `PartitionSpec` of every array of `state` (arrays or shapes): each entry of a
    `stacked` kind's part (and of its stored sides) along its leading axis over its
    `entry_axes` (`axis_name`, or a sharded leaf's own axes), the other kinds' parts
    replicated, the momentum as `mu_specs` (a tree like the params), everything else
    replicated."""
    plan = state.plan.tree
    replicated = lambda _: PartitionSpec()

    def specs(kind: AbstractKind, part: tuple) -> tuple:
        if not kind.stacked:
            return jax.tree.map(replicated, part)
        return tuple(
            jax.tree.map(functools.partial(stacked_spec, names), entry)
            for entry, names in zip(part, kind.entry_axes(plan, axis_name), strict=True)
        )

    parts = {k.name: specs(k, getattr(state, k.name)) for k in KINDS}
    cache = None
    if state.cache is not None:
        cache = state.cache.__class__(
            **{k.name: specs(k, getattr(state.cache, k.name)) for k in KINDS if k.caches}
        )
    return jax.tree.map(replicated, state)._replace(
        mu=None if state.mu is None else mu_specs, cache=cache, **parts
    )
