"""Train a small MLP with `wk.quad` on a 2 x 2 device mesh, as JAX builds it by default
(Explicit axes): the batch split over `data`, the optimizer's stacked Kronecker factors
spread over both axes, `data` and `pipeline` (a quarter of every stack per device).

Run: `python examples/multi_device.py` (simulates 4 CPU devices; a few seconds).
"""

import os


# Simulate 4 devices on the CPU; drop this line on a machine with 4 accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk


mesh = jax.make_mesh((2, 2), ("data", "pipeline"))  # Explicit axes, JAX's default

model = eqx.nn.MLP(16, 1, width_size=64, depth=2, key=jax.random.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)

# Every stack of factors (dense tiles, large-leaf strips) is padded to a multiple of
# `pipeline_axis_size` and spread over the mesh axes of `pipeline_axis_name`.
optimizer = wk.quad(
    learning_rate=1e-2,
    pipeline_axis_name=("data", "pipeline"),
    pipeline_axis_size=mesh.size,
)


def loss_fn(params, x, y):
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@eqx.filter_jit(donate="all-except-first")
def train_step(xy, params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, *xy)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


target = jax.random.normal(jax.random.key(1), (16, 1)) / 4


def batch(step: int):
    x = jax.random.normal(jax.random.key(step), (64, 16))
    y = jnp.tanh(x @ target)
    return jax.device_put((x, y), NamedSharding(mesh, P("data")))


with jax.set_mesh(mesh):
    # No shardings to pass: `init` and `update` place the stacks themselves, and the
    # shardings are in the arrays' types.
    opt_state = optimizer.init(params)
    for step in range(201):
        params, opt_state, loss = train_step(batch(step), params, opt_state)
        if step % 50 == 0:
            print(f"step {step:3d}  loss {float(loss):.4f}")

factors = opt_state[0].dense[0].Ql  # one bucket of dense tiles: [tiles, side, side]
print("stacked factors:", factors.shape, jax.typeof(factors).sharding.spec)
for shard in factors.addressable_shards:
    print(f"  {shard.device}: tiles {shard.index[0]}")
