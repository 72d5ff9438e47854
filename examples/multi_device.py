"""Train a small MLP with `wk.quad` on a 2 x 2 device mesh: the batch split over `data`,
the optimizer's stacked Kronecker factors split over `pipeline`.

Run: `python examples/multi_device.py` (simulates 4 CPU devices; a few seconds).
"""

import os


# Simulate 4 devices on the CPU; drop this line on a machine with 4 accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import wkron_eqx as wk


# wkron_eqx places its state with sharding constraints, which need Auto mesh axes
# (`jax.make_mesh` defaults to Explicit ones).
mesh = jax.make_mesh((2, 2), ("data", "pipeline"), axis_types=(AxisType.Auto,) * 2)

model = eqx.nn.MLP(16, 1, width_size=64, depth=2, key=jax.random.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)

# Every stack of factors (dense tiles, large-leaf strips) is padded to a multiple of
# `pipeline_axis_size` and split over `pipeline_axis_name`.
opt_kwargs = dict(
    learning_rate=1e-2,
    pipeline_axis_name="pipeline",
    pipeline_axis_size=mesh.shape["pipeline"],
    params_partition_specs=P(),  # params are replicated here; the momentum follows them
)
optimizer = wk.quad(**opt_kwargs)

# Specs for the params and the optimizer state, as NamedShardings on the mesh.
is_spec = lambda x: isinstance(x, P)
on_mesh = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
param_shardings = on_mesh(jax.tree.map(lambda _: P(), params))
opt_shardings = on_mesh(wk.get_opt_state_partition_specs(params, **opt_kwargs))
batch_sharding = NamedSharding(mesh, P("data"))


def loss_fn(params, x, y):
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@functools.partial(
    jax.jit,
    out_shardings=(param_shardings, opt_shardings, None),
    donate_argnums=(0, 1),
)
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


target = jax.random.normal(jax.random.key(1), (16, 1)) / 4


def batch(step: int):
    x = jax.random.normal(jax.random.key(step), (64, 16))
    y = jnp.tanh(x @ target)
    return jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)


with jax.set_mesh(mesh):
    params = jax.device_put(params, param_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    for step in range(201):
        params, opt_state, loss = train_step(params, opt_state, *batch(step))
        if step % 50 == 0:
            print(f"step {step:3d}  loss {float(loss):.4f}")

factors = opt_state[0].dense[0].Ql  # one bucket of dense tiles: [tiles, side, side]
print("stacked factors:", factors.shape, factors.sharding.spec)
for shard in factors.addressable_shards:
    print(f"  {shard.device}: tiles {shard.index[0]}")
