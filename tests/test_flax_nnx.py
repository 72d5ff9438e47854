"""Flax NNX: the documented `nnx.Optimizer(model, tx, wrt=nnx.Param)` pattern under
`nnx.jit`, with `nnx.Linear`, `nnx.Conv` and `nnx.BatchNorm` (and partitioned params)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


nnx = pytest.importorskip("flax.nnx")

import wkron_eqx as wk  # noqa: E402


class CNN(nnx.Module):
    def __init__(self, rngs, partitioned: bool = False):
        init = nnx.initializers.lecun_normal()
        if partitioned:
            init = nnx.with_partitioning(init, (None, None, None, "model"))
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), kernel_init=init, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.linear = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.linear(x.reshape(x.shape[0], -1))


def _data():
    x = jax.random.normal(jax.random.key(1), (32, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 3)
    return x, y


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _optimizer(rule: str):
    return getattr(wk, rule)(learning_rate=1e-2, weight_decay=1e-4, dtype=jnp.float32)


@pytest.mark.parametrize("rule, partitioned", [("quad", False), ("skew", True)])
def test_nnx_optimizer_trains_under_nnx_jit(rule, partitioned):
    # Partitioned params need a mesh with their axis names (one device is enough).
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        model = CNN(nnx.Rngs(0), partitioned)
        opt = nnx.Optimizer(model, _optimizer(rule), wrt=nnx.Param)
        x, y = _data()

        @nnx.jit
        def step(model, opt, x, y):
            loss, grads = nnx.value_and_grad(_loss)(model, x, y)
            opt.update(model, grads)
            return loss

        losses = [float(step(model, opt, x, y)) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
    # The optimizer state counts every step and holds no NNX variable types.
    inner = opt.opt_state[0]
    assert int(inner.count[...]) == 30 and int(inner.factor_updates[...]) == 30


def test_nnx_update_equals_the_plain_optax_update():
    """One `opt.update` moves every `nnx.Param` by exactly what the same optimizer
    computes on the plain pytree of gradients."""
    x, y = _data()
    model = CNN(nnx.Rngs(0))
    tx = _optimizer("skew")
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(_loss)(model, x, y)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    plain_grads = nnx.to_pure_dict(grads)
    expected, _ = jax.jit(tx.update)(plain_grads, tx.init(before), before)

    nnx.jit(lambda model, opt, grads: opt.update(model, grads))(model, opt, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: a - b, after, before)
    for m, e in zip(jax.tree.leaves(moved), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(m), np.asarray(e), rtol=1e-5, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(m))) > 0 for m in jax.tree.leaves(moved))
