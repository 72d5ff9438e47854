"""`get_opt_state_partition_specs`: the `PartitionSpec` tree of a `quad`/`skew` state."""

import inspect
from typing import Any, TypeAlias

import jax
from jax.sharding import PartitionSpec
from jaxtyping import ArrayLike, PyTree

from ._alias import quad, scale_by_quad
from ._config import check_weight_decay, python_scalar
from ._kinds import state_specs
from ._sharding import specs_tree


# Specs are usually wanted before any parameter exists: `jax.eval_shape` output is fine too.
ParamsOrShapes: TypeAlias = PyTree[ArrayLike | jax.ShapeDtypeStruct]

_QUAD_KWARGS = frozenset(inspect.signature(quad).parameters)
_SCALE_KWARGS = frozenset(inspect.signature(scale_by_quad).parameters)


def _param_spec(p: Any) -> PartitionSpec:
    """A param's committed sharding (on Auto axes it is not in its type: `type_spec`
    would say replicated)."""
    sharding = getattr(p, "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec if isinstance(spec, PartitionSpec) else PartitionSpec()


def get_opt_state_partition_specs(params: ParamsOrShapes, **kwargs) -> tuple:
    """The `PartitionSpec` tree of the state of `quad(**kwargs)` / `skew(**kwargs)`.

    Stacked factor arrays (every `DenseState` field, a large leaf's factors, and the
    stored sides of `cache_preconditioner`) are sharded over `pipeline_axis_name`
    along their leading axis; the momentum follows `params_partition_specs` (or the
    params' own shardings); everything else is replicated. Unlike the reference, the
    default `weight_decay` here is the one of `quad`/`skew` (0.1), so the specs always
    match `quad(**kwargs).init(params)`.

    **Arguments:**

    - `params`: the parameters (arrays or `jax.ShapeDtypeStruct`s).
    - `**kwargs`: any keyword arguments of `quad` / `skew`.

    **Returns:**

    `(state_specs, None, None)` when `weight_decay > 0`, else `(state_specs, None)`;
    `state_specs` is a `WhiteKronState` whose array leaves are `PartitionSpec`s.
    Pass it through `NamedSharding` to `jax.jit(..., out_shardings=...)`.
    """
    unknown = set(kwargs) - _QUAD_KWARGS
    if unknown:
        raise TypeError(f"Unknown keyword arguments: {sorted(unknown)}.")
    weight_decay = python_scalar(
        kwargs.get("weight_decay", inspect.signature(quad).parameters["weight_decay"].default)
    )
    check_weight_decay(weight_decay)
    scale_kwargs = {k: v for k, v in kwargs.items() if k in _SCALE_KWARGS}
    # `init` refuses a bad `scanned_layers` tree with the same ValueError.
    shapes = jax.eval_shape(scale_by_quad(**scale_kwargs).init, params)
    mu = None
    if shapes.mu is not None:
        mu = specs_tree(params, scale_kwargs.get("params_partition_specs"), _param_spec)
    specs = state_specs(shapes, scale_kwargs.get("pipeline_axis_name"), mu)
    # quad/skew always add the decay for an array weight_decay (it may be injected)
    has_decay = isinstance(weight_decay, jax.Array) or weight_decay > 0
    return (specs, None, None) if has_decay else (specs, None)
