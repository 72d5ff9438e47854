"""Buffer donation of the optimizer state: no two arrays of a state share a buffer,
after `init` and after `update`, so `jax.jit(..., donate_argnums=...)` and
`eqx.filter_jit(..., donate="all")` run, for every kind and option."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wkron_eqx as wk

from .helpers import assert_no_shared_buffers


# Every kind: dense tiles (two of the same shape: one bucket), a large leaf with strips,
# 1-D leaves and a scalar, a scanned stack and an empty leaf.
def _params():
    key = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda *shape: jax.random.normal(next(key), shape)
    return {
        "w1": normal(12, 8),
        "w2": normal(12, 8),
        "large": normal(40, 6),
        "b": normal(8),
        "scale": normal(),
        "stack": normal(3, 8, 8),
        "empty": jnp.zeros((0, 4)),
    }


_SCANNED = {k: k == "stack" for k in _params()}
_COMMON = dict(
    learning_rate=1e-2, block_size=8, max_size_dense=32, scanned_layers=_SCANNED, weight_decay=0.0
)
CASES = {
    "quad": (wk.quad, dict(dtype=jnp.float32)),
    "skew-bf16-pipeline": (wk.skew, dict(pipeline_axis_size=2)),
    "quad-no-momentum": (wk.quad, dict(b1=0.0, dtype=jnp.float32)),
    "skew-normalized-p0.5": (
        wk.skew,
        dict(normalize_grads=True, preconditioner_update_probability=0.5, dtype=jnp.float32),
    ),
    "quad-cached-bf16-p0.5": (
        wk.quad,
        dict(cache_preconditioner=True, preconditioner_update_probability=0.5),
    ),
}


def _optimizer(name):
    factory, kwargs = CASES[name]
    return factory(**_COMMON, **kwargs)


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", list(CASES))
def test_donated_state_in_a_jitted_update(name):
    params = _params()
    tx = _optimizer(name)
    state = tx.init(params)
    assert_no_shared_buffers(state)
    update = jax.jit(tx.update, donate_argnums=(1,))
    # (One case also runs undonated: donation changes where the state lives, not what
    # it holds. One compile fewer for the others.)
    reference = jax.jit(tx.update) if name == "quad" else None
    expected_state = state
    for seed in range(3):
        grads = _grads(params, seed)
        if reference is not None:
            expected, expected_state = reference(grads, expected_state, params)
        updates, state = update(grads, state, params)
        assert_no_shared_buffers(state)
        if reference is not None:
            for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(e))
    inner = state[0]  # quad/skew: the preconditioner's state, then the weight decay's
    assert int(inner.count) == 3 and int(inner.skipped_steps) == 0


def test_eager_update_state_has_no_shared_buffers():
    # (Un-jitted, so a small tree: one dense leaf and one 1-D leaf.)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = wk.quad(learning_rate=1e-2, dtype=jnp.float32)
    _, state = tx.update(_grads(params, 0), tx.init(params), params)
    assert_no_shared_buffers(state)


class _Model(eqx.Module):
    layers: list
    bias: jax.Array

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [eqx.nn.Linear(6, 12, key=k1), eqx.nn.Linear(12, 3, key=k2)]
        self.bias = jnp.zeros(3)

    def __call__(self, x):
        return self.layers[1](jax.nn.tanh(self.layers[0](x))) + self.bias


@pytest.mark.parametrize("name", ["quad", "skew-bf16-pipeline"])
def test_filter_jit_step_donating_model_and_state(name):
    model = _Model(jax.random.key(1))
    factory, kwargs = CASES[name]
    tx = factory(learning_rate=1e-2, block_size=8, weight_decay=1e-4, **kwargs)
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    x = jax.random.normal(jax.random.key(2), (16, 6))
    y = jax.random.randint(jax.random.key(3), (16,), 0, 3)

    @eqx.filter_jit(donate="all")
    def step(model, state, x, y):
        def loss_fn(model):
            logits = jax.vmap(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = tx.update(grads, state, params)
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for _ in range(4):
        model, state, loss = step(model, state, x, y)
        assert_no_shared_buffers((model, state))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
