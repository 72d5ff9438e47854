"""Pipeline sharding: constraints on stacked axes inside `init` and `update`, and running
both under a mesh with Explicit axes. (The partition specs of a whole state are
`_kinds.state_specs`.)

(`get_opt_state_partition_specs`, which builds on the transforms, is in `_specs.py`.)
"""

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec
from jaxtyping import Array

from ._custom_types import AxisNames
from ._layout import ShardGrid


def _meshes_in_scope() -> list[Any]:
    """The meshes in scope: the abstract one (`jax.set_mesh`) and the deprecated
    `with Mesh(...):` context of older code (not an abstract mesh), where present."""
    meshes = []
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is not None and not abstract.empty:
        meshes.append(abstract)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.interpreters.pxla import thread_resources

        physical = thread_resources.env.physical_mesh
        if not physical.empty:
            meshes.append(physical)
    except (ImportError, AttributeError):
        pass
    return meshes


def _active_axes() -> dict[str, AxisType]:
    """Axis name -> axis type of the mesh in scope (`jax.set_mesh`, or `with mesh:`)."""
    axes: dict[str, AxisType] = {}
    for mesh in _meshes_in_scope():
        axes.update(zip(mesh.axis_names, mesh.axis_types))
    return axes


def mesh_sizes() -> dict[str, int]:
    """Axis name -> size of the mesh in scope (`jax.set_mesh`, or `with mesh:`)."""
    sizes: dict[str, int] = {}
    for mesh in _meshes_in_scope():
        sizes.update(zip(mesh.axis_names, mesh.axis_sizes))
    return sizes


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


def axis_names(axis_name: AxisNames) -> tuple[str, ...]:
    """`pipeline_axis_name` as a tuple of names (empty for `None`)."""
    if axis_name is None:
        return ()
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def active_stack_axis(axis_name: AxisNames, stack_size: int) -> AxisNames:
    """`axis_name` when the mesh in scope has every one of its axes, else `None`; a
    mesh with only some of them, or whose axes' sizes do not divide `stack_size`
    (`pipeline_axis_size`), is refused with a `ValueError` that names them."""
    names = axis_names(axis_name)
    if not names:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    present = set() if mesh is None or mesh.empty else set(mesh.axis_names)
    sizes = {} if mesh is None or mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    present |= set(_active_axes())  # the deprecated `with mesh:` too
    if not present & set(names):
        return None
    if missing := [n for n in names if n not in present]:
        raise ValueError(
            f"`pipeline_axis_name={axis_name!r}` names mesh axes {missing} that the active "
            f"mesh (axes {sorted(present)}) lacks."
        )
    total = 1
    for n in names:
        total *= sizes.get(n, 1)
    if stack_size % total:
        raise ValueError(
            f"`pipeline_axis_size={stack_size}` must be a multiple of the size of the "
            f"mesh axes {names} it shards over, which is {total}: pass "
            f"`pipeline_axis_size={total}`."
        )
    return axis_name


def _stack_entry(names: tuple[str, ...]) -> str | tuple[str, ...]:
    """The spec entry of a stack's leading axis: one mesh axis, or several together."""
    return names[0] if len(names) == 1 else names


def constrain_stack(x: Array, axis_name: AxisNames) -> Array:
    """Shard the leading (stack) axis of `x` over `axis_name` (one mesh axis or
    several) when a mesh with those axes is active; otherwise return `x` unchanged."""
    names = axis_names(axis_name)
    if not names or x.ndim == 0:
        return x
    axes = _active_axes()
    if not all(n in axes for n in names):
        return x
    return _constrain(x, PartitionSpec(_stack_entry(names)), axes)


def constrain_like(x: Array, spec: PartitionSpec | None) -> Array:
    """Constrain `x` to `spec` (the parameter's own spec) when a mesh is active."""
    if spec is None:
        return x
    axes = _active_axes()
    if not axes:
        return x
    return _constrain(x, spec, axes)


def stacked_spec(axis_name: AxisNames, x: Any) -> PartitionSpec:
    """The spec of a stack `x`: its leading axis over `axis_name` (replicated without
    one, or for a 0-d `x`)."""
    names = axis_names(axis_name)
    if not names or x.ndim == 0:
        return PartitionSpec()
    return PartitionSpec(_stack_entry(names), *([None] * (x.ndim - 1)))


def leaf_specs(params: Any, specs: Any) -> list[PartitionSpec | None]:
    """`params_partition_specs` broadcast to one entry per leaf of `params` (flattening
    order): `None` for every leaf when there are none, one `PartitionSpec` for all, or a
    tree of them matching the params (refused with a `ValueError` otherwise)."""
    leaves, treedef = jax.tree.flatten(params)
    if specs is None:
        return [None] * len(leaves)
    if isinstance(specs, PartitionSpec):
        return [specs] * len(leaves)
    try:
        return list(treedef.flatten_up_to(specs))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`params_partition_specs` must be a PartitionSpec or a tree of them matching "
            f"the params: {e}"
        ) from None


def specs_tree(params: Any, specs: Any, own: Callable[[Any], PartitionSpec]) -> Any:
    """A tree like `params` of the specs `leaf_specs` gives, each leaf without one
    taking `own(leaf)` (its own sharding)."""
    leaves, treedef = jax.tree.flatten(params)
    given = leaf_specs(params, specs)
    return treedef.unflatten([own(p) if s is None else s for p, s in zip(leaves, given)])


def type_spec(x: Any) -> PartitionSpec:
    """The `PartitionSpec` in `x`'s type (sharding in types), or in its committed
    sharding; replicated when it has neither."""
    for sharding in (getattr(jax.typeof(x), "sharding", None), getattr(x, "sharding", None)):
        spec = getattr(sharding, "spec", None)
        if isinstance(spec, PartitionSpec):
            return spec
    return PartitionSpec()


def _without(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` with the named `axes` left out (they are Auto inside `with_auto_axes`)."""

    def keep(entry):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            return entry
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n not in axes)
        return None if not names else names[0] if len(names) == 1 else names

    return PartitionSpec(*(keep(e) for e in spec))


def with_auto_axes(fun: Callable, out_specs: Callable[..., Any]) -> Callable:
    """`fun`, run with the active mesh's Explicit axes turned Auto (so that its sharding
    constraints place the stacks), its outputs then resharded to `out_specs(out, *args)`.

    Under no mesh, or one with Auto axes only, `fun` itself runs. This is
    `jax.sharding.auto_axes` with output specs that follow from the output's structure,
    which the caller cannot know in advance.
    """

    @functools.wraps(fun)
    def run(*args):
        mesh = jax.sharding.get_abstract_mesh()
        explicit = () if mesh is None or mesh.empty else tuple(mesh.explicit_axes)
        if not explicit:
            return fun(*args)
        auto = mesh.update_axis_types({name: AxisType.Auto for name in explicit})
        with jax.sharding.use_abstract_mesh(auto):
            inner = jax.tree.map(
                lambda x: (
                    jax.sharding.reshard(x, _without(type_spec(x), explicit))
                    if isinstance(x, jax.Array)
                    else x
                ),
                args,
            )
            out = fun(*inner)
        # Only the Explicit axes go in the types; the Auto ones (of a mixed mesh) were
        # placed by the constraints inside.
        others = tuple(n for n in mesh.axis_names if n not in explicit)
        specs = jax.tree.map(
            lambda spec: _without(spec, others),
            out_specs(out, *args),
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        return jax.sharding.reshard(out, specs)

    return run


def _typed(x: Any) -> tuple[PartitionSpec | None, dict[str, int]]:
    """The spec in `x`'s type (Explicit axes) and its mesh's sizes; `(None, {})` if none."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        sharding = getattr(x, "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if not isinstance(spec, PartitionSpec) or mesh is None or not mesh.axis_names:
        return None, {}
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
    if not explicit:
        return None, {}
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return _without(spec, tuple(n for n in mesh.axis_names if n not in explicit)), sizes


def entry_names(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_grids(
    leaves: Sequence[Any],
    paths: Sequence[str],
    specs: Sequence[PartitionSpec | None],
    axis_name: AxisNames,
    given_sizes: tuple[tuple[str, int], ...] | None,
) -> tuple[ShardGrid | None, ...]:
    """How each leaf is sharded (`ShardGrid`), for the shard-local layout: from its
    entry of `specs` (`params_partition_specs`), else from its type (Explicit axes);
    over the sizes `given_sizes` (`mesh_axis_sizes`), else those of the mesh in scope
    or of the leaf's type. `None` for a leaf that is not sharded, or whose sharding's
    sizes are unknown (no mesh). A dimension its shards do not divide evenly is
    refused with a `ValueError` naming the leaf.

    `axis_name` (`pipeline_axis_name`): the replica axes among them spread each
    shard's entries further (`ShardGrid.spread`)."""
    scope = dict(given_sizes) if given_sizes is not None else mesh_sizes()
    grids: list[ShardGrid | None] = []
    for x, path, spec in zip(leaves, paths, specs, strict=True):
        sizes = scope
        if spec is None:
            spec, typed_sizes = _typed(x)
            sizes = scope if given_sizes is not None else typed_sizes | scope
        shape = tuple(int(d) for d in jax.numpy.shape(x))
        if spec is None or len(spec) > len(shape):
            grids.append(None)
            continue
        names = tuple(entry_names(e) for e in tuple(spec) + (None,) * (len(shape) - len(spec)))
        if missing := sorted({n for dim in names for n in dim if n not in sizes}):
            if given_sizes is not None:
                raise ValueError(
                    f"The params leaf at {path} is sharded over mesh axes {missing}, which "
                    f"`mesh_axis_sizes` ({dict(given_sizes)}) lacks: give their sizes."
                )
            grids.append(None)  # no mesh in scope: its sizes are unknown
            continue
        counts = tuple(math.prod(sizes[n] for n in dim) for dim in names)
        for d, (size, count) in enumerate(zip(shape, counts, strict=True)):
            if size % count:
                raise ValueError(
                    f"The params leaf at {path} has size {size} along dimension {d}, "
                    f"which its sharding {spec} splits into {count} shards: the shard-"
                    f"local layout needs even shards. Pad that dimension to a multiple "
                    f"of {count}, shard it over fewer devices, or pass "
                    f"`follow_shards=False`."
                )
        if math.prod(counts) == 1:
            grids.append(None)
            continue
        grid = ShardGrid(counts, names)
        spread = tuple(
            n for n in axis_names(axis_name) if n not in grid.axes and sizes.get(n, 1) > 1
        )
        grids.append(grid._replace(spread=spread, spread_size=math.prod(sizes[n] for n in spread)))
    return tuple(grids)
