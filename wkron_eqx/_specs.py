"""`get_opt_state_partition_specs`: the `PartitionSpec` tree of a `quad`/`skew` state."""

import inspect
from typing import Any, TypeAlias

import jax
from jax.sharding import PartitionSpec
from jaxtyping import ArrayLike, PyTree

from ._alias import quad, scale_by_quad
from ._kinds import state_specs
from ._sharding import entry_names, leaf_specs, mesh_sizes, specs_tree


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


def _check_sizes_known(params: ParamsOrShapes, kwargs: dict) -> None:
    """The shard-local layout depends on the sizes of the axes `params_partition_specs`
    names: refuse to guess them (the specs would not match `init`'s under the mesh)."""
    specs = kwargs.get("params_partition_specs")
    if specs is None or not kwargs.get("follow_shards", True):
        return
    if kwargs.get("mesh_axis_sizes") is not None:
        return
    named = {
        name
        for spec in leaf_specs(params, specs)
        if spec is not None
        for entry in spec
        for name in entry_names(entry)
    }
    if missing := sorted(named - set(mesh_sizes())):
        raise ValueError(
            f"`params_partition_specs` shards the params over mesh axes {missing}, whose "
            "sizes decide the state's layout (each shard is tiled on its own): call "
            "`get_opt_state_partition_specs` under the mesh (`with jax.set_mesh(mesh):`), "
            "or pass `mesh_axis_sizes=dict(mesh.shape)` (or `follow_shards=False`)."
        )


def get_opt_state_partition_specs(params: ParamsOrShapes, **kwargs) -> tuple:
    """The `PartitionSpec` tree of the state of `quad(**kwargs)` / `skew(**kwargs)`.

    Stacked factor arrays (every `DenseState` field, a large leaf's factors, and the
    stored sides of `cache_preconditioner`) are sharded along their leading axis over
    `pipeline_axis_name`, or, for the stacks of leaves planned shard by shard
    (`follow_shards`), over the axes their shards lie on (and the pipeline axes that
    do not shard them); the momentum follows `params_partition_specs` (or the
    params' own shardings); everything else is replicated. Unlike the reference, the
    default `weight_decay` here is the one of `quad`/`skew` (0.1), and the rest of the
    chain is not `None`: the specs have exactly the tree structure of
    `quad(**kwargs).init(params)`.

    **Arguments:**

    - `params`: the parameters (arrays or `jax.ShapeDtypeStruct`s).
    - `**kwargs`: any keyword arguments of `quad` / `skew`.

    **Returns:**

    `(state_specs, decay, lr)`, shaped as the chain's state: `state_specs` is a
    `WhiteKronState` whose array leaves are `PartitionSpec`s; the weight decay's and
    the learning rate's parts are their states as `init` makes them, with
    `PartitionSpec()` for their arrays (a schedule's `count`): mostly an
    `optax.EmptyState()`, which has no leaves. Map it through `NamedSharding`
    (`is_leaf=lambda x: isinstance(x, PartitionSpec)`) for `jax.jit(...,
    out_shardings=...)` or `jax.device_put`.
    """
    unknown = set(kwargs) - _QUAD_KWARGS
    if unknown:
        raise TypeError(f"Unknown keyword arguments: {sorted(unknown)}.")
    scale_kwargs = {k: v for k, v in kwargs.items() if k in _SCALE_KWARGS}
    _check_sizes_known(params, scale_kwargs)
    # `quad` checks the arguments; `init` refuses a bad `scanned_layers` tree with the
    # same ValueError. `skew`'s state has the same structure.
    shapes = jax.eval_shape(quad(**kwargs).init, params)
    inner, rest = shapes[0], tuple(shapes[1:])
    mu = None
    if inner.mu is not None:
        mu = specs_tree(params, scale_kwargs.get("params_partition_specs"), _param_spec)
    specs = state_specs(inner, scale_kwargs.get("pipeline_axis_name"), mu)
    # The decay's and the learning rate's states: EmptyState (no leaves), a MaskedState
    # around one, or a schedule's scalar count (replicated).
    return (specs, *jax.tree.map(lambda _: PartitionSpec(), rest))
