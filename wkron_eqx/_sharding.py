"""Pipeline sharding: constraints on stacked axes inside `init` and `update`.

(`get_opt_state_partition_specs`, which builds on the transforms, is in `_specs.py`.)
"""

import warnings

import jax
from jax.sharding import AxisType, PartitionSpec
from jaxtyping import Array


def _active_axes() -> dict[str, AxisType]:
    """Axis name -> axis type of the mesh in scope (`jax.set_mesh`, or `with mesh:`)."""
    axes: dict[str, AxisType] = {}
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty:
        axes.update(zip(abstract.axis_names, abstract.axis_types))
    try:  # the deprecated `with Mesh(...):` context of older code (not an abstract mesh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.interpreters.pxla import thread_resources

        physical = thread_resources.env.physical_mesh
        if not physical.empty:
            axes.update(zip(physical.axis_names, physical.axis_types))
    except (ImportError, AttributeError):
        pass
    return axes


def _constrain(x: Array, spec: PartitionSpec, axes: dict[str, AxisType]) -> Array:
    explicit = sorted(name for name, kind in axes.items() if kind == AxisType.Explicit)
    if explicit:
        # `with_sharding_constraint` is only an assertion on Explicit axes, and the
        # batched factor maths does not type-check under sharding-in-types.
        raise ValueError(
            f"The active mesh has Explicit axes {explicit}; wkron_eqx shards its state "
            "with sharding constraints, which need Auto axes. Build the mesh with "
            "`axis_types=(jax.sharding.AxisType.Auto, ...)` (`jax.make_mesh` defaults to "
            "Explicit), or call `init`/`update` inside `jax.sharding.auto_axes`."
        )
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_stack(x: Array, axis_name: str | None) -> Array:
    """Shard the leading (stack) axis of `x` over `axis_name` when a mesh with that
    axis is active; otherwise return `x` unchanged."""
    if axis_name is None or x.ndim == 0:
        return x
    axes = _active_axes()
    if axis_name not in axes:
        return x
    return _constrain(x, PartitionSpec(axis_name), axes)


def constrain_like(x: Array, spec: PartitionSpec | None) -> Array:
    """Constrain `x` to `spec` (the parameter's own spec) when a mesh is active."""
    if spec is None:
        return x
    axes = _active_axes()
    if not axes:
        return x
    return _constrain(x, spec, axes)
