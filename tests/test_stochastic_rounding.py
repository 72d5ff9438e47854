"""`stochastic_rounding`: unbiased rounding of the stored factors and momentum to
bfloat16, with bits from the step counter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk
from wkron_eqx._noise import stochastic_round

from .helpers import assert_trees_equal, run_steps


_ULP_AT_ONE = 2.0**-7  # bfloat16's spacing on [1, 2)


@pytest.mark.parametrize("offset", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_rounding_is_unbiased(offset, sign):
    value = sign * (1.0 + offset * _ULP_AT_ONE)
    x = jnp.full((4096,), value, jnp.float32)
    draws = jax.vmap(lambda step: stochastic_round(x, jnp.bfloat16, step))(jnp.arange(64))
    draws = np.asarray(draws.astype(jnp.float32), np.float64)
    # Only the two neighbours come out, in the right proportion.
    assert set(np.unique(np.abs(draws))) <= {1.0, 1.0 + _ULP_AT_ONE}
    assert abs(draws.mean() - value) < 0.01 * _ULP_AT_ONE
    # Nearest rounding is biased by up to half an ulp.
    nearest = float(x.astype(jnp.bfloat16)[0])
    assert abs(nearest - value) >= min(offset, 1 - offset) * _ULP_AT_ONE * 0.999


def test_a_small_relative_step_is_lost_by_nearest_rounding_and_kept_in_expectation():
    """A factor moved by a relative 1e-4 per step (an eightieth of an ulp): nearest
    rounding keeps it at 1 for ever; stochastic rounding follows `(1 + 1e-4)^t` on
    average over many entries."""
    steps, rate = 500, 1e-4
    nearest = stochastic = jnp.ones(4096, jnp.bfloat16)

    @jax.jit
    def step(nearest, stochastic, t):
        grow = lambda q: q.astype(jnp.float32) * (1 + rate)
        return grow(nearest).astype(jnp.bfloat16), stochastic_round(
            grow(stochastic), jnp.bfloat16, t
        )

    for t in range(steps):
        nearest, stochastic = step(nearest, stochastic, t)
    expected = (1 + rate) ** steps
    assert np.all(np.asarray(nearest.astype(jnp.float32)) == 1.0)
    mean = float(jnp.mean(stochastic.astype(jnp.float32)))
    assert abs(mean - expected) < 0.05 * (expected - 1)


def test_non_finite_values_and_float32_storage_are_plain_casts():
    x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 3.0], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(stochastic_round(x, jnp.bfloat16, 7).astype(jnp.float32)),
        np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)),
    )
    y = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_array_equal(stochastic_round(y, jnp.float32, 3), y)


_PARAMS = {"w": jnp.ones((12, 8)), "big": jnp.ones((40, 3)), "b": jnp.ones(8)}


@functools.cache
def _tx(dtype, rounding):
    """One transform per case, so that runs of the same case share one compile."""
    return wk.scale_by_quad(
        dtype=dtype, block_size=8, max_size_dense=32, stochastic_rounding=rounding
    )


def _gradients(steps: int) -> list[dict]:
    """Standard-normal gradients of `_PARAMS`' shapes, from `jax.random.key(0)`."""
    key, out = jax.random.key(0), []
    leaves, treedef = jax.tree.flatten(_PARAMS)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, len(leaves))
        out.append(
            treedef.unflatten(
                [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
            )
        )
    return out


def _run(dtype, rounding, steps=3):
    updates, states = run_steps(_tx(dtype, rounding), _PARAMS, _gradients(steps))
    return updates, states[-1]


def test_the_optimizer_rounds_deterministically_and_only_bfloat16_storage():
    (a, state_a), (b, state_b) = _run(jnp.bfloat16, True), _run(jnp.bfloat16, True)
    assert_trees_equal((a, state_a), (b, state_b))  # the same run draws the same bits
    _, plain = _run(jnp.bfloat16, False)
    for new, old in [
        (state_a.dense[0].Ql, plain.dense[0].Ql),
        (state_a.leaf_tree()["big"].Ql, plain.leaf_tree()["big"].Ql),
        (state_a.leaf_tree()["b"].Ql, plain.leaf_tree()["b"].Ql),
        (state_a.mu["w"], plain.mu["w"]),
    ]:
        assert new.dtype == old.dtype == jnp.bfloat16
        assert not np.array_equal(np.asarray(new), np.asarray(old))
        # Within an ulp or two of the nearest-rounded run after three steps.
        np.testing.assert_allclose(
            np.asarray(new, np.float32), np.asarray(old, np.float32), rtol=0.05, atol=0.02
        )
    # Float32 storage has nothing to round.
    assert_trees_equal(_run(jnp.float32, True), _run(jnp.float32, False))
