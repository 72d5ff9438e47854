"""The multi-device half of `test_sharding.py`, run in a subprocess of its own.

It needs `XLA_FLAGS=--xla_force_host_platform_device_count=4` before jax is imported,
which a pytest process that has already imported jax cannot give, so the checks run here
and print their measurements as one JSON object on the last line of stdout; the tests
assert on them. Run by hand: `python tests/_sharded_run.py`.
"""

import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import json
import sys
import tempfile
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import cosine  # (run as a script: `tests/` is on the path)
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import wkron_eqx as wk


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

AXIS = "pp"
STEPS = 5
RESUME_AT = 2  # the state saved after this many steps is restored and continued
SHAPES = {
    "dense": (40, 24),  # 3 x 2 tiles of block 16, in three buckets
    "conv": (3, 3, 4, 8),  # merged to (9, 32)
    "large": (100, 20),  # rows > max_size_dense: diagonal left, 2 strips with dense right
    "huge": (80, 70),  # both sides diagonal: one entry
    "bias": (24,),
    "scalar": (),
    "stack": (3, 16, 8),  # scanned: 3 dense layers
    "stack_large": (2, 72, 8),  # scanned: 2 large layers
}
SCANNED = {name: name.startswith("stack") for name in SHAPES}
# `dense` is row-sharded like a tensor-parallel weight, so the momentum follows it.
PARAM_SPECS = {name: P(AXIS, None) if name == "dense" else P() for name in SHAPES}
CONFIG = dict(
    learning_rate=0.01,
    dtype=jnp.float32,
    noise_scale=0.0,
    max_size_dense=64,
    block_size=16,
    scanned_layers=SCANNED,
)
# The stacks spread over the pipeline axis, every leaf planned whole (the layout before
# `follow_shards`; the shard-local layout is `_shard_local_run.py`'s).
SHARDED = dict(
    CONFIG,
    pipeline_axis_name=AXIS,
    pipeline_axis_size=4,
    params_partition_specs=PARAM_SPECS,
    follow_shards=False,
)
is_spec = lambda x: isinstance(x, P)


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _named_leaves(inner):
    """(path, LeafState) of every params leaf."""
    return zip(inner.plan.paths, inner.leaf_states(), strict=True)


def _stacked_arrays(state) -> dict[str, jax.Array]:
    """Every array of the state that is stacked along the pipeline axis, by path."""
    inner = state[0]
    out = {}
    for i, bucket in enumerate(inner.dense):
        for field, x in bucket.to_dict().items():
            if isinstance(x, jax.Array):
                out[f"dense[{i}].{field}"] = x
    for name, leaf in _named_leaves(inner):
        if leaf.kind == wk.LARGE_PATH:
            for field, x in leaf.to_dict().items():
                if isinstance(x, jax.Array):
                    out[f"leaves{name}.{field}"] = x
    return out


def _placement(x: jax.Array) -> dict:
    shards = x.addressable_shards
    return {
        "stack": x.shape[0],
        "devices": len({s.device for s in shards}),
        "shard_rows": sorted(s.data.shape[0] for s in shards),
        "starts": sorted(s.index[0].start or 0 for s in shards),
        "spec": str(getattr(x.sharding, "spec", None)),
    }


def _mismatches(state, shardings) -> list[str]:
    """Paths of the state arrays whose sharding is not the one of the specs."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    expected = jax.tree.leaves(shardings)
    return [
        jax.tree_util.keystr(path)
        for (path, x), want in zip(flat, expected, strict=True)
        if not x.sharding.is_equivalent_to(want, x.ndim)
    ]


def _dummies_inert(state) -> bool:
    """Pipeline dummies (entries whose valid size is 0) hold zero factors, zero L."""
    for bucket in state[0].dense:
        dummies = slice(bucket.valid_count, None)
        for x in (bucket.Ql[dummies], bucket.Qr[dummies], bucket.Ll[dummies], bucket.Lr[dummies]):
            if np.any(np.asarray(x) != 0):
                return False
    for leaf in state[0].leaf_states():
        if leaf.kind == wk.LARGE_PATH:
            dummy = (np.asarray(leaf.valid_rows) == 0) | (np.asarray(leaf.valid_cols) == 0)
            for x in (leaf.Ql, leaf.Qr, leaf.Ll, leaf.Lr):
                if np.any(np.asarray(x)[dummy] != 0):
                    return False
    leaves = jax.tree.leaves(state)
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves if x.dtype.kind == "f")


def _with_options(grads: list, params0: dict, mesh, options: dict, field: str) -> dict:
    """Four steps with `options` on the mesh against the same run on one device, and
    where the arrays of the state's `field` are placed."""
    tx = wk.quad(**CONFIG, **options)
    state, single = jax.jit(tx.init)(params0), []
    for g in grads[:4]:
        u, state = jax.jit(tx.update)(g, state, params0)
        single.append(u)
    sharded_tx = wk.quad(**SHARDED, **options)
    specs = wk.get_opt_state_partition_specs(params0, **SHARDED, **options)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    with jax.set_mesh(mesh):
        state = jax.jit(sharded_tx.init, out_shardings=shardings)(params0)
        update = jax.jit(sharded_tx.update, out_shardings=(None, shardings))
        cosines = []
        for g, want in zip(grads[:4], single, strict=True):
            u, state = update(g, state, params0)
            cosines += [cosine(u[k], want[k]) for k in SHAPES]
        sides = {
            f"{jax.tree_util.keystr(path)}": _placement(x)
            for path, x in jax.tree_util.tree_flatten_with_path(getattr(state[0], field))[0]
        }
    return {
        "min_cosine": min(cosines),
        "placement": sides,
        "mismatch": _mismatches(state, shardings),
    }


def _explicit(grads, params0, single, mesh, pipeline: int = 4) -> dict:
    """Steps on a mesh with Explicit axes, the weights of `dense` sharded over its first
    axis: cosines against one device, and the specs in the results' types."""
    config = dict(SHARDED, pipeline_axis_size=pipeline, params_partition_specs=None)
    tx = wk.quad(**config)
    first = mesh.axis_names[0]
    spec = lambda k: P(first, None) if k == "dense" else P()
    place = lambda tree: {
        k: jax.device_put(v, NamedSharding(mesh, spec(k))) for k, v in tree.items()
    }
    typed = lambda x: str(jax.typeof(x).sharding.spec)
    with jax.set_mesh(mesh):
        params = place(params0)
        state = jax.jit(tx.init)(params)
        init_specs = {k: typed(x) for k, x in _stacked_arrays(state).items()}
        update = jax.jit(tx.update)
        cosines = {k: [] for k in SHAPES}
        for g, want in zip(grads, single, strict=True):
            u, state = update(place(g), state, params)
            for k in SHAPES:
                cosines[k].append(cosine(u[k], want[k]))
        return {
            "min_cosine": {k: min(v) for k, v in cosines.items()},
            "init_specs": init_specs,
            "update_specs": {k: typed(x) for k, x in _stacked_arrays(state).items()},
            "placement": {k: _placement(x) for k, x in _stacked_arrays(state).items()},
            "mu_specs": {k: typed(x) for k, x in state[0].mu.items()},
            "update_out_specs": {k: typed(x) for k, x in u.items()},
        }


def main() -> dict:
    report: dict = {"devices": jax.device_count()}
    params0 = _arrays(0)
    grads = [_arrays(step + 1) for step in range(STEPS)]

    # The single-device optimizer: no mesh, no pipeline padding.
    tx = wk.quad(**CONFIG)
    update = jax.jit(tx.update)
    params, state = {k: jnp.asarray(v) for k, v in params0.items()}, jax.jit(tx.init)(params0)
    single = []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        single.append(jax.device_get(u))

    mesh = jax.make_mesh((4,), (AXIS,), axis_types=(AxisType.Auto,))
    sharded_tx = wk.quad(**SHARDED)
    specs = wk.get_opt_state_partition_specs(params0, **SHARDED)
    state_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    param_sharding = {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()}
    place = lambda tree: jax.device_put(tree, param_sharding)

    with jax.set_mesh(mesh):
        init = jax.jit(sharded_tx.init, out_shardings=state_sharding)
        sharded_update = jax.jit(sharded_tx.update, out_shardings=(param_sharding, state_sharding))
        params, state = place(params0), init(place(params0))
        cosines = {k: [] for k in SHAPES}
        saved, resumed_from = None, None
        for step, g in enumerate(grads):
            if step == RESUME_AT:
                saved = tempfile.NamedTemporaryFile(suffix=".eqx", delete=False).name
                eqx.tree_serialise_leaves(saved, (params, state))
                resumed_from = step
            u, state = sharded_update(place(g), state, params)
            params = optax.apply_updates(params, u)
            for k in SHAPES:
                cosines[k].append(cosine(u[k], single[step][k]))
            if step == resumed_from:
                continuing = [jax.device_get(u)]
            elif resumed_from is not None:
                continuing.append(jax.device_get(u))
        report["min_cosine"] = {k: min(v) for k, v in cosines.items()}
        report["placement"] = {k: _placement(x) for k, x in _stacked_arrays(state).items()}
        report["mu_spec"] = {k: str(x.sharding.spec) for k, x in state[0].mu.items()}
        report["dummies_inert"] = _dummies_inert(state)
        report["finite_updates"] = all(
            bool(np.all(np.isfinite(u[k]))) for u in continuing for k in SHAPES
        )
        final = jax.device_get(state)

        # Restore into a freshly initialised sharded state, keeping each leaf's sharding.
        like = (place(params0), init(place(params0)))
        load = lambda f, x: jax.device_put(np.load(f), x.sharding) if eqx.is_array(x) else x
        params, state = eqx.tree_deserialise_leaves(saved, like, filter_spec=load)
        os.unlink(saved)
        report["restored_shardings_equal"] = all(
            a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(like[1]), strict=True)
        )
        resumed = []
        for g in grads[RESUME_AT:]:
            u, state = sharded_update(place(g), state, params)
            params = optax.apply_updates(params, u)
            resumed.append(jax.device_get(u))
        report["resume_bit_identical"] = all(
            np.array_equal(a, b, equal_nan=True)
            for x, y in zip(resumed, continuing, strict=True)
            for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
        ) and all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(final))
        )

        # The constraints alone (no out_shardings) place the stacks and the momentum,
        # as `get_opt_state_partition_specs` says.
        bare = jax.jit(sharded_tx.init)(place(params0))
        stepped = jax.jit(sharded_tx.update)(place(grads[0]), bare, place(params0))[1]
        report["constraint_mismatch"] = {
            "init": _mismatches(bare, state_sharding),
            "update": _mismatches(stepped, state_sharding),
        }
        report["constraint_placement"] = {
            "init": {k: _placement(x) for k, x in _stacked_arrays(bare).items()},
            "update": {k: _placement(x) for k, x in _stacked_arrays(stepped).items()},
        }

    # `cache_preconditioner` (p = 0.5: steps alternate between updating the factors and
    # applying the stored sides), and `damping` (its memory replicated).
    cached = dict(cache_preconditioner=True, preconditioner_update_probability=0.5)
    report["cached"] = _with_options(grads, params0, mesh, cached, "cache")
    report["damped"] = _with_options(grads, params0, mesh, dict(damping=0.1), "damping_memory")

    # The deprecated `with mesh:` context is detected too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with mesh:
            legacy = jax.jit(sharded_tx.init)(params0)
    report["legacy_mesh_specs"] = sorted(
        {str(x.sharding.spec) for x in _stacked_arrays(legacy).values()}
    )

    # `jax.make_mesh` defaults to Explicit axes: `init` and `update` run unwrapped, and
    # the shardings are in the results' types.
    report["explicit"] = _explicit(grads, params0, single, jax.make_mesh((4,), (AXIS,)))
    # A mixed mesh: the data axis Explicit, the pipeline axis Auto.
    mixed = jax.make_mesh((2, 2), ("data", AXIS), axis_types=(AxisType.Explicit, AxisType.Auto))
    report["mixed"] = _explicit(grads, params0, single, mixed, pipeline=2)
    return report


if __name__ == "__main__":
    result = main()
    sys.stdout.write("\n" + json.dumps(result) + "\n")
