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


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
        return nnx.tanh(self.linear(x))


class _Stacked(nnx.Module):
    """Three blocks built with `nnx.vmap` (one leading layer axis), then a head."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return _Block(rngs)

        self.blocks = blocks(rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def through(block, x):
            return block(x)

        return self.head(through(self.blocks, x))


def _stacked_data():
    x = jax.random.normal(jax.random.key(1), (16, 6))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    return x, y


def test_stacked_layers_with_a_plain_dict_prefix():
    """`scanned_layers={"blocks": True, "head": False}` against the model's `nnx.State`
    (matched by key path) gives each layer of the stack its own factors, and the step
    equals the plain optax update with the same flags given as a full tree."""
    model = _Stacked(nnx.Rngs(0))
    kwargs = dict(learning_rate=1e-2, weight_decay=1e-4, dtype=jnp.float32)
    opt = nnx.Optimizer(
        model, wk.quad(scanned_layers={"blocks": True, "head": False}, **kwargs), wrt=nnx.Param
    )
    inner = opt.opt_state[0]
    by_path = dict(zip(inner.plan.paths, inner.leaf_states(), strict=True))
    assert {p: s.B for p, s in by_path.items()} == {
        "['blocks']['linear']['bias']": 3,
        "['blocks']['linear']['kernel']": 3,
        "['head']['bias']": 1,
        "['head']['kernel']": 1,
    }

    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flags = {"blocks": jax.tree.map(lambda _: True, before["blocks"])}
    flags["head"] = jax.tree.map(lambda _: False, before["head"])
    tx = wk.quad(scanned_layers=flags, **kwargs)
    x, y = _stacked_data()
    grads = nnx.grad(_loss)(model, x, y)
    expected, _ = jax.jit(tx.update)(nnx.to_pure_dict(grads), tx.init(before), before)

    nnx.jit(lambda model, opt, grads: opt.update(model, grads))(model, opt, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: a - b, after, before)
    for m, e in zip(jax.tree.leaves(moved), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(m), np.asarray(e), rtol=1e-5, atol=1e-7)


def test_a_dict_prefix_that_misses_a_leaf_names_it_and_the_recipe():
    model = _Stacked(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"nothing in it covers \['head'\]\['bias'\].*nnx.state"):
        nnx.Optimizer(model, wk.quad(scanned_layers={"blocks": True}), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"name no params leaf: \['tail'\]"):
        flags = {"blocks": True, "head": False, "tail": True}
        nnx.Optimizer(model, wk.quad(scanned_layers=flags), wrt=nnx.Param)


def test_donating_the_model_and_optimizer_under_nnx_jit():
    """`nnx.jit(..., donate_argnums=(0, 1))` donates the params and the optimizer
    state (whose arrays share no buffer); training goes on and matches the undonated run."""
    x, y = _stacked_data()
    kwargs = dict(learning_rate=1e-2, weight_decay=1e-4, dtype=jnp.float32)

    def train(donate):
        model = _Stacked(nnx.Rngs(0))
        tx = wk.skew(scanned_layers={"blocks": True, "head": False}, **kwargs)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

        def step(model, opt, x, y):
            loss, grads = nnx.value_and_grad(_loss)(model, x, y)
            opt.update(model, grads)
            return loss

        step = nnx.jit(step, donate_argnums=(0, 1) if donate else ())
        return [float(step(model, opt, x, y)) for _ in range(4)]

    donated = train(True)
    assert donated == train(False)
    assert donated[-1] < donated[0]
