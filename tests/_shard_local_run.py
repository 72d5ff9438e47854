"""The mesh half of `test_shard_local_mesh.py`, run in a subprocess of its own (8
simulated devices, set before jax is imported): FSDP-sharded weights on a `2 x 4` mesh
with the shard-local layout, under each option set, against a one-device run of the
same layout; where the state lives; the collectives; specs, checkpoints, donation,
Auto and mixed meshes, `eqx.filter_jit`. Prints one JSON object on the last line of
stdout. Run by hand: `python tests/_shard_local_run.py`.
"""

import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import json
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import (
    collectives,
    cosine,
    fullest_device_bytes,
    normal_tree,
    trimmed_spec,
)  # (run as a script: `tests/` is on the path)
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import wkron_eqx as wk


AXES = ("data", "fsdp")
SIZES = {"data": 2, "fsdp": 4}
SHAPES = {
    "embed": (96, 16),  # rows > max_size_dense: a diagonal side per shard, dense strips
    "w_rows": (32, 24),  # 8-row shards, tiles of 8 x 16 and 8 x 8
    "w_cols": (24, 32),
    "w_2d": (32, 16),  # rows over fsdp, cols over data
    "stack": (2, 32, 16),  # scanned, rows sharded
    "stack_layers": (2, 16, 16),  # scanned, the layer axis over data, rows over fsdp
    "bias": (24,),
}
SPECS = {
    "embed": P("fsdp", None),
    "w_rows": P("fsdp", None),
    "w_cols": P(None, "fsdp"),
    "w_2d": P("fsdp", "data"),
    "stack": P(None, "fsdp", None),
    "stack_layers": P("data", "fsdp", None),
    "bias": P(),
}
BASE = dict(
    learning_rate=0.01,
    dtype=jnp.float32,
    noise_scale=0.0,
    max_size_dense=64,
    block_size=16,
    scanned_layers={k: k.startswith("stack") for k in SHAPES},
)
OPTIONS = {
    "default": {},
    "bf16 + stochastic rounding + p=0.5 + cache": dict(
        dtype=jnp.bfloat16,
        stochastic_rounding=True,
        preconditioner_update_probability=0.5,
        cache_preconditioner=True,
    ),
    "one_diag + damping + init from the gradient": dict(
        memory_save_mode="one_diag", damping=0.5, preconditioner_init_scale=None
    ),
    "skew, all_diag, b1=0": dict(memory_save_mode="all_diag", b1=0.0),
    "ZeRO over data": dict(pipeline_axis_name="data", pipeline_axis_size=2),
}
STEPS = 3


def _grads(step: int) -> dict:
    return normal_tree(SHAPES, seed=100 + step)


def _place(tree, mesh):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, SPECS)


def _factory(name: str, **extra):
    """The optimizer of option set `name` (`BASE` and its options, then `extra`)."""
    make = wk.skew if name.startswith("skew") else wk.quad
    return make(**(BASE | OPTIONS[name] | extra))


def _one_device(name: str, params) -> list:
    """The updates of a one-device run of the same shard-aligned layout."""
    tx = _factory(name, params_partition_specs=SPECS, mesh_axis_sizes=SIZES)
    state, out = tx.init(params), []
    for step in range(STEPS):
        u, state = jax.jit(tx.update)(_grads(step), state, params)
        out.append(u)
    return out


def options_on_the_mesh() -> dict:
    """Each option set: sharded (Explicit mesh) against one device with the same
    layout; every stack sharded over its leaf's axes; specs match the state."""
    params = normal_tree(SHAPES, seed=0)
    mesh = jax.make_mesh((2, 4), AXES)
    report = {}
    for name, options in OPTIONS.items():
        want = _one_device(name, params)
        tx = _factory(name)
        with jax.set_mesh(mesh):
            p = _place(params, mesh)
            state = tx.init(p)
            update = jax.jit(tx.update, donate_argnums=1)
            cosines = []
            for step in range(STEPS):
                u, state = update(_place(_grads(step), mesh), state, p)
                cosines += [cosine(u[k], want[step][k]) for k in SHAPES]
            kwargs = {k: v for k, v in (BASE | options).items() if k != "learning_rate"}
            specs = wk.get_opt_state_partition_specs(p, **kwargs)[0]
            inner = state[0]
            stacks = {
                f"dense[{i}]": str(jax.typeof(d.Ql).sharding.spec)
                for i, d in enumerate(inner.dense)
            }
            for path, leaf in zip(inner.plan.paths, inner.leaf_states(), strict=True):
                if leaf.kind == wk.LARGE_PATH:
                    stacks[path] = str(jax.typeof(leaf.Qr).sharding.spec)
            report[name] = {
                "min_cosine": min(cosines),
                "finite": bool(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))),
                "stacks": stacks,
                "specs_match": all(
                    trimmed_spec(s) == trimmed_spec(jax.typeof(x).sharding.spec)
                    for s, x in zip(
                        jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
                        jax.tree.leaves(inner),
                        strict=True,
                    )
                ),
                "updates_sharded_like_params": all(
                    trimmed_spec(jax.typeof(u[k]).sharding.spec) == trimmed_spec(SPECS[k])
                    for k in SHAPES
                ),
                "fullest_device_bytes": fullest_device_bytes(state),
                "single_device_bytes": sum(x.nbytes for x in jax.tree.leaves(tx.init(params))),
                "factor_updates": int(inner.factor_updates),
            }
    return report


def _loss(params, x):
    """A loss that gathers every weight first (FSDP)."""
    if not jax.sharding.get_abstract_mesh().empty:
        params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)
    h = jnp.tanh(x @ params["w_rows"] @ params["w_cols"] @ params["w_2d"])
    h = h + params["embed"][:8].sum(0)
    for name in ("stack", "stack_layers"):
        for layer in params[name]:
            h = jnp.tanh(h @ layer[: h.shape[-1]])
    return jnp.mean(h**2) + jnp.mean(params["bias"] ** 2)


def training_step_collectives() -> dict:
    """The bytes a whole FSDP training step moves, adamw against quad (shard-local and
    the old layout), and the compiled step's collectives."""
    params = normal_tree(SHAPES, seed=0)
    mesh = jax.make_mesh((2, 4), AXES)
    out = {}
    for name, tx in {
        "adamw": optax.adamw(1e-2),
        "quad": wk.quad(**BASE),
        "quad, old layout": wk.quad(**BASE, follow_shards=False),
    }.items():

        def step(params, state, x, tx=tx):
            grads = jax.grad(_loss)(params, x)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        with jax.set_mesh(mesh):
            p = _place(params, mesh)
            state = tx.init(p)
            x = jax.device_put(jnp.ones((8, 32)), NamedSharding(mesh, P("data")))
            hlo = jax.jit(step).lower(p, state, x).compile().as_text()
            p, state = eqx.filter_jit(step)(p, state, x)  # (as users write it)
        out[name] = {kind: {"count": c, "elements": e} for kind, (c, e) in collectives(hlo).items()}
    return out


def checkpoint_and_auto_meshes() -> dict:
    """A state saved after one step restores into a sharded state and continues bit for
    bit; an Auto mesh with `params_partition_specs`, and a mixed mesh, plan the same
    layout as the Explicit one."""
    params = normal_tree(SHAPES, seed=0)
    tx = wk.quad(**BASE)
    report = {}
    mesh = jax.make_mesh((2, 4), AXES)
    with jax.set_mesh(mesh):
        p = _place(params, mesh)
        update = jax.jit(tx.update)
        state = tx.init(p)
        _, state = update(_place(_grads(0), mesh), state, p)
        path = tempfile.NamedTemporaryFile(suffix=".eqx", delete=False).name
        eqx.tree_serialise_leaves(path, state)
        u_direct, _ = update(_place(_grads(1), mesh), state, p)
        like = tx.init(p)
        restored = eqx.tree_deserialise_leaves(path, like)
        # (As a user restores a checkpoint: onto the shardings of a fresh state.)
        restored = jax.tree.map(lambda x, y: jax.device_put(x, y.sharding), restored, like)
        u_restored, _ = update(_place(_grads(1), mesh), restored, p)
        report["restored_bit_identical"] = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(u_direct), jax.tree.leaves(u_restored), strict=True)
        )
        report["restored_sharding_kept"] = all(
            a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
        )
        explicit_plan = state[0].plan.tree
    meshes = {
        "auto": jax.make_mesh((2, 4), AXES, axis_types=(AxisType.Auto,) * 2),
        "mixed": jax.make_mesh((2, 4), AXES, axis_types=(AxisType.Explicit, AxisType.Auto)),
    }
    for name, mesh in meshes.items():
        auto_tx = wk.quad(**BASE, params_partition_specs=SPECS)
        with jax.set_mesh(mesh):
            p = _place(params, mesh)
            state = jax.jit(auto_tx.init)(p)
            u, state = jax.jit(auto_tx.update)(_place(_grads(0), mesh), state, p)
            report[name] = {
                "same_plan": state[0].plan.tree == explicit_plan,
                "finite": bool(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))),
                "dense_devices": sorted(
                    {len({s.device for s in d.Ql.addressable_shards}) for d in state[0].dense}
                ),
            }
    return report


def jit_with_shardings_and_nnx() -> dict:
    """`jax.jit(init, out_shardings=...)` from `get_opt_state_partition_specs`, and a
    Flax NNX model whose `nnx.with_partitioning` kernels are sharded by the mesh."""
    from flax import nnx

    params = normal_tree(SHAPES, seed=0)
    tx = wk.quad(**BASE)
    mesh = jax.make_mesh((2, 4), AXES)
    report = {}
    with jax.set_mesh(mesh):
        p = _place(params, mesh)
        kwargs = {k: v for k, v in BASE.items() if k != "learning_rate"}
        specs = wk.get_opt_state_partition_specs(p, **kwargs)
        shardings = jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
        )
        state = jax.jit(tx.init, out_shardings=shardings)(p)
        u, state = jax.jit(tx.update, out_shardings=(None, shardings))(
            _place(_grads(0), mesh), state, p
        )
        report["jit_out_shardings_equal_eager"] = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree.leaves(u),
                jax.tree.leaves(jax.jit(tx.update)(_place(_grads(0), mesh), tx.init(p), p)[0]),
                strict=True,
            )
        )

        class MLP(nnx.Module):
            def __init__(self, rngs):
                init = nnx.initializers.lecun_normal()
                rows, cols = (
                    nnx.with_partitioning(init, s) for s in (("fsdp", None), (None, "fsdp"))
                )
                self.l1 = nnx.Linear(16, 32, kernel_init=rows, rngs=rngs)
                self.l2 = nnx.Linear(32, 8, kernel_init=cols, rngs=rngs)

            def __call__(self, x):
                return self.l2(nnx.relu(self.l1(x)))

        model = MLP(nnx.Rngs(0))
        opt = nnx.Optimizer(model, wk.quad(1e-2, dtype=jnp.float32, block_size=8), wrt=nnx.Param)
        x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))

        @nnx.jit
        def step(model, opt, x):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
            opt.update(model, grads)
            return loss

        losses = [float(step(model, opt, x)) for _ in range(5)]
        inner = opt.opt_state[0]
        report["nnx"] = {
            "losses": losses,
            "sharded_leaves": sum(leaf.grid is not None for leaf in inner.plan.tree.leaves),
            "dense_specs": sorted({str(jax.typeof(d.Ql[...]).sharding.spec) for d in inner.dense}),
        }
    return report


if __name__ == "__main__":
    result = {
        "jit_and_nnx": jit_with_shardings_and_nnx(),
        "devices": jax.device_count(),
        "options": options_on_the_mesh(),
        "collectives": training_step_collectives(),
        "checkpoint_and_meshes": checkpoint_and_auto_meshes(),
    }
    sys.stdout.write("\n" + json.dumps(result) + "\n")
