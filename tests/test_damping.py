"""`damping`: a per-leaf memory of the input's peak RMS, and each leaf's update scaled by
`min(1, r / (d M))`; checked against a NumPy re-derivation, and through the idioms a
state has to survive (skips, checkpoints, donation, scans, partition specs)."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import wkron_eqx as wk

from .helpers import assert_trees_equal, run_steps


SHAPES = {"w": (12, 8), "b": (8,), "c": (3, 3, 2, 4), "s": ()}
OPTIONS = dict(learning_rate=0.1, weight_decay=0.0, dtype=jnp.float32, noise_scale=0.0)
FACTORIES = {"quad": wk.quad, "skew": wk.skew}


def _params():
    return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def _gradients(steps: int, seed: int = 0) -> list[dict]:
    """Gradients whose size falls by 2x a step after step 3 (and by another 10x for
    `w`), so the damping acts on some leaves and steps and not on others."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        size = 0.5 ** max(t - 3, 0)
        out.append(
            {
                k: jnp.asarray(
                    rng.standard_normal(s) * size * (0.1**t if k == "w" else 1), jnp.float32
                )
                for k, s in SHAPES.items()
            }
        )
    return out


@pytest.mark.parametrize(
    "value", [-1e-3, float("inf"), float("nan"), "1e-3", jnp.asarray(1e-3)], ids=repr
)
def test_a_bad_damping_is_refused_at_construction(value):
    with pytest.raises((ValueError, TypeError), match="damping"):
        wk.quad(damping=value)


def test_damping_with_normalize_grads_is_refused():
    with pytest.raises(ValueError, match="normalize_grads"):
        wk.skew(damping=1e-3, normalize_grads=True)


def test_no_damping_stores_nothing():
    state = wk.quad().init(_params())
    assert state[0].damping_memory is None
    assert wk.quad(damping=1e-2).init(_params())[0].damping_memory.shape == (len(SHAPES),)


@pytest.mark.parametrize("rule", FACTORIES)
@pytest.mark.parametrize("b1, damping", [(0.95, 0.3), (0.0, 1e-2)])
def test_memory_and_scales_follow_the_numpy_derivation(rule, b1, damping):
    """The factors do not depend on the damping, so each leaf's damped update is the
    undamped one times `min(1, r / (d M))`, with `r` the RMS of the bias-corrected
    momentum (re-derived here) and `M` its running peak."""
    grads = _gradients(12)
    plain, plain_states = run_steps(FACTORIES[rule](**OPTIONS, b1=b1), _params(), grads)
    damped, states = run_steps(FACTORIES[rule](**OPTIONS, b1=b1, damping=damping), _params(), grads)
    names = sorted(SHAPES)  # (the leaves' flattening order)
    mu = {k: np.zeros(s) for k, s in SHAPES.items()}
    peak = np.zeros(len(names))
    acted = 0
    for t, (g, u, v, state) in enumerate(zip(grads, damped, plain, states, strict=True), 1):
        rms = np.zeros(len(names))
        for i, k in enumerate(names):
            mu[k] = b1 * mu[k] + (1 - b1) * np.asarray(g[k], np.float64)
            corrected = mu[k] / (1 - b1**t) if b1 else np.asarray(g[k], np.float64)
            rms[i] = np.sqrt(np.mean(np.square(corrected)))
        peak = np.maximum(peak, rms)
        np.testing.assert_allclose(np.asarray(state[0].damping_memory), peak, rtol=1e-5)
        for i, k in enumerate(names):
            scale = min(1.0, rms[i] / (damping * peak[i]))
            acted += scale < 0.99
            np.testing.assert_allclose(
                np.asarray(u[k]), scale * np.asarray(v[k]), rtol=2e-5, atol=1e-12
            )
    assert acted > 5  # the case damps some leaves on some steps
    # and leaves the factors alone
    last, plain_last = states[-1][0], plain_states[-1][0]
    assert_trees_equal((last.large, last.one_d), (plain_last.large, plain_last.one_d))
    assert_trees_equal(states[-1][0].dense, plain_states[-1][0].dense)


def test_a_skipped_step_keeps_the_memory():
    tx = wk.quad(**OPTIONS, damping=1e-2)
    grads = _gradients(3)
    _, states = run_steps(tx, _params(), grads)
    bad = jax.tree.map(lambda x: x.at[...].set(jnp.nan), grads[0])
    u, after = jax.jit(tx.update)(bad, states[-1], _params())
    assert int(after[0].skipped_steps) == 1
    np.testing.assert_array_equal(after[0].damping_memory, states[-1][0].damping_memory)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


def test_checkpoint_donation_and_scan_carry_the_memory():
    tx = wk.skew(**OPTIONS, damping=1e-2)
    grads = _gradients(6)
    params = _params()
    _, states = run_steps(tx, params, grads[:3])
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, states[-1])
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, tx.init(params))
    assert_trees_equal(restored, states[-1])

    # the rest as a donated jitted step (the same bits as without donation), and as one
    # `lax.scan` (another program: the same to rounding)
    donating = jax.jit(tx.update, donate_argnums=1)
    state = jax.tree.map(jnp.copy, restored)
    for g in grads[3:]:
        _, state = donating(g, state, params)
    _, undonated = run_steps(tx, params, grads)
    assert_trees_equal(state, undonated[-1])

    def body(state, g):
        return tx.update(g, state, params)[1], None

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads[3:])
    scanned, _ = jax.jit(lambda s: jax.lax.scan(body, s, stacked))(restored)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert float(jnp.min(state[0].damping_memory)) > 0


def test_partition_specs_cover_the_memory():
    params = _params()
    specs = wk.get_opt_state_partition_specs(params, damping=1e-2, weight_decay=0.0)
    state = jax.eval_shape(wk.quad(damping=1e-2, weight_decay=0.0).init, params)
    assert specs[0].damping_memory == P()
    is_spec = lambda x: isinstance(x, P)
    assert jax.tree.structure(specs[0], is_leaf=is_spec) == jax.tree.structure(
        jax.tree.map(lambda _: P(), state[0]), is_leaf=is_spec
    )


def test_the_damping_lets_a_quadratic_converge_at_a_constant_learning_rate():
    """The point of it: on `0.5 |x - x*|^2` at a constant learning rate the undamped
    step hovers near `0.2 lr`, the damped one converges."""
    target = jnp.asarray(np.random.default_rng(1).standard_normal((8, 6)), jnp.float32)

    def final_error(damping: float) -> float:
        tx = wk.quad(**OPTIONS | dict(learning_rate=0.1), damping=damping)
        x, state = jnp.zeros_like(target), tx.init(target)

        def body(carry, _):
            x, state = carry
            u, state = tx.update(x - target, state, x)
            return (optax.apply_updates(x, u), state), None

        (x, _), _ = jax.lax.scan(body, (x, state), None, length=600)
        return float(jnp.linalg.norm(x - target) / jnp.linalg.norm(target))

    # measured: 1.1e-2 undamped, 1.9e-7 damped
    assert final_error(0.0) > 3e-3
    assert final_error(1e-2) < 3e-6
