"""Pipeline sharding: constraints on stacked axes and `get_opt_state_partition_specs`."""

import jax
from jax.sharding import PartitionSpec
from jaxtyping import Array


def _active_axis_names() -> tuple[str, ...]:
    names: tuple[str, ...] = ()
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty:
        names += tuple(abstract.axis_names)
    try:  # the `with Mesh(...):` context of older code
        from jax._src.mesh import thread_resources

        physical = thread_resources.env.physical_mesh
        if not physical.empty:
            names += tuple(physical.axis_names)
    except (ImportError, AttributeError):
        pass
    return names


def constrain_stack(x: Array, axis_name: str | None) -> Array:
    """Shard the leading (stack) axis of `x` over `axis_name` when a mesh with that
    axis is active; otherwise return `x` unchanged."""
    if axis_name is None or x.ndim == 0 or axis_name not in _active_axis_names():
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axis_name))


def constrain_like(x: Array, spec: PartitionSpec | None) -> Array:
    """Constrain `x` to `spec` (the parameter's own spec) when a mesh is active."""
    if spec is None or not _active_axis_names():
        return x
    return jax.lax.with_sharding_constraint(x, spec)
