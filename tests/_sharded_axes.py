"""The 8-device half of `test_sharding.py`, run in a subprocess of its own: the stacks
spread over two mesh axes (`pipeline_axis_name=("data", "fsdp")`) on a `2 x 4` mesh with
Explicit axes, and FSDP-sharded weights in a jitted Equinox training step. Prints one
JSON object on the last line of stdout. Run by hand: `python tests/_sharded_axes.py`.
"""

import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import json
import sys

import jax
import jax.numpy as jnp
from helpers import cosine, normal_tree, trimmed_spec  # (run as a script: `tests/` is on the path)
from jax.sharding import PartitionSpec as P

import wkron_eqx as wk


AXES = ("data", "fsdp")
SHAPES = {
    "dense": (40, 24),
    "large": (100, 20),
    "bias": (24,),
    "stack": (3, 16, 8),
}
CONFIG = dict(
    learning_rate=0.01,
    dtype=jnp.float32,
    noise_scale=0.0,
    max_size_dense=64,
    block_size=16,
    scanned_layers={k: k == "stack" for k in SHAPES},
)


def _stacks(state) -> dict:
    inner = state[0]
    out = {
        f"dense[{i}].{k}": x
        for i, d in enumerate(inner.dense)
        for k, x in d.to_dict().items()
        if isinstance(x, jax.Array)
    }
    for path, leaf in zip(inner.plan.paths, inner.leaf_states(), strict=True):
        if leaf.kind == wk.LARGE_PATH:
            out |= {f"{path}.{k}": x for k, x in leaf.to_dict().items() if isinstance(x, jax.Array)}
    return out


def two_axes() -> dict:
    params, grads = normal_tree(SHAPES, 0), [normal_tree(SHAPES, s + 1) for s in range(3)]
    tx = wk.quad(**CONFIG)
    state, single = tx.init(params), []
    for g in grads:
        u, state = jax.jit(tx.update)(g, state, params)
        single.append(u)
    sharded = dict(CONFIG, pipeline_axis_name=AXES, pipeline_axis_size=8)
    tx = wk.quad(**sharded)
    mesh = jax.make_mesh((2, 4), AXES)
    report: dict = {}
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        cosines = []
        for g, want in zip(grads, single, strict=True):
            u, state = jax.jit(tx.update)(g, state, params)
            cosines += [cosine(u[k], want[k]) for k in SHAPES]
        report["min_cosine"] = min(cosines)
        report["stacks"] = {
            k: {
                "stack": x.shape[0],
                "shard_rows": sorted({s.data.shape[0] for s in x.addressable_shards}),
                "devices": len({s.device for s in x.addressable_shards}),
                "spec": str(jax.typeof(x).sharding.spec),
            }
            for k, x in _stacks(state).items()
        }
        specs = wk.get_opt_state_partition_specs(params, **sharded)[0]
        report["specs_match"] = all(
            trimmed_spec(spec) == trimmed_spec(jax.typeof(x).sharding.spec)
            for spec, x in zip(
                jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
                jax.tree.leaves(state[0]),
                strict=True,
            )
        )
        errors = {}
        for name, kwargs in {
            "size": dict(pipeline_axis_name=AXES, pipeline_axis_size=4),
            "missing": dict(pipeline_axis_name=("data", "pp"), pipeline_axis_size=8),
        }.items():
            try:
                wk.quad(**CONFIG, **kwargs).init(params)
                errors[name] = None
            except ValueError as e:
                errors[name] = str(e)
        report["errors"] = errors
    return report


def fsdp() -> dict:
    """An Equinox MLP whose weights are sharded `P("fsdp", None)` or `P(None, "fsdp")`,
    trained by a jitted step with the stacks over `("data", "fsdp")`: cosine per leaf
    against one device over 3 steps, and where the weights and momentum live."""
    import equinox as eqx
    import optax

    model = eqx.nn.MLP(24, 16, width_size=40, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tx = wk.quad(**dict(CONFIG, scanned_layers=None), pipeline_axis_name=AXES, pipeline_axis_size=8)

    def loss(params, x):
        return jnp.mean(jax.vmap(eqx.combine(params, static))(x) ** 2)

    def stepper(tx):
        @eqx.filter_jit
        def step(params, state, x):
            grads = jax.grad(loss)(params, x)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        return step

    xs = [jax.random.normal(jax.random.key(s), (16, 24)) for s in range(3)]
    mesh = jax.make_mesh((2, 4), AXES)
    report = {}
    for layout, spec in (("rows", P("fsdp", None)), ("cols", P(None, "fsdp"))):
        # One device, the same shard-aligned layout (`mesh_axis_sizes`).
        specs = jax.tree.map(lambda x: spec if x.ndim == 2 else P(), params)
        plain = wk.quad(
            **dict(CONFIG, scanned_layers=None),
            params_partition_specs=specs,
            mesh_axis_sizes=dict(zip(AXES, (2, 4))),
        )
        p, state, single = params, plain.init(params), []
        for x in xs:
            p, state, u = stepper(plain)(p, state, x)
            single.append(u)
        with jax.set_mesh(mesh):
            place = lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.ndim == 2 else P()))
            p = jax.tree.map(place, params)
            state, cosines = tx.init(p), []
            for x, want in zip(xs, single, strict=True):
                x = jax.device_put(x, NamedSharding(mesh, P("data")))
                p, state, u = stepper(tx)(p, state, x)
                cosines += [cosine(a, b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want))]
            weight = p.layers[1].weight
            report[layout] = {
                "min_cosine": min(cosines),
                "weight_spec": str(jax.typeof(weight).sharding.spec),
                "mu_spec": str(jax.typeof(state[0].mu.layers[1].weight).sharding.spec),
                "update_spec": str(jax.typeof(u.layers[1].weight).sharding.spec),
            }
    return report


if __name__ == "__main__":
    from jax.sharding import NamedSharding

    result = {"devices": jax.device_count(), "two_axes": two_axes(), "fsdp": fsdp()}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
