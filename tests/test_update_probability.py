"""`preconditioner_update_probability`: the deterministic counter scheme and its schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk


# The quick subset `tools/mutations.py` runs against each mutant.
pytestmark = pytest.mark.fast


def test_schedule_closed_form():
    schedule = wk.precond_update_prob_schedule(max_prob=1.0, min_prob=0.03, decay=0.001)
    for n in [0, 1, 499, 500, 501, 1000, 2500, 10_000]:
        expected = min(max(math.exp(-0.001 * (n - 500)), 0.03), 1.0)
        assert float(schedule(n)) == pytest.approx(expected, rel=1e-6)
    assert float(jax.jit(schedule)(jnp.int32(1500))) == pytest.approx(math.exp(-1.0), rel=1e-6)


@pytest.mark.parametrize("bad", [dict(min_prob=0.0), dict(max_prob=1.5), dict(decay=-1.0)])
def test_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        wk.precond_update_prob_schedule(**bad)


@pytest.mark.parametrize("prob", [0.25, lambda step: jnp.where(step < 3, 1.0, 0.5)])
def test_factors_update_exactly_when_the_counter_reaches_one_over_p(prob):
    params = {"w": jnp.ones((12, 10)), "b": jnp.ones(10)}
    grads = {"w": jnp.linspace(-1, 1, 120).reshape(12, 10), "b": jnp.linspace(0.5, 1, 10)}
    tx = wk.scale_by_quad(
        b1=0.0, dtype=jnp.float32, noise_scale=0.0, preconditioner_update_probability=prob
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    refreshed, counters = [], []
    for _ in range(10):
        old = state
        updates, state = update(grads, state, params)
        changed = not np.array_equal(np.asarray(old.dense[0].Ql), np.asarray(state.dense[0].Ql))
        refreshed.append(changed)
        counters.append(int(state.update_counter))
        # a step without a factor update applies the current factors: Pl G Pr, then clip
        if not changed:
            Pl = np.asarray(old.dense[0].Ql[0]).T @ np.asarray(old.dense[0].Ql[0])
            Pr = np.asarray(old.dense[0].Qr[0]).T @ np.asarray(old.dense[0].Qr[0])
            out = Pl[:12, :12] @ np.asarray(grads["w"]) @ Pr[:10, :10]
            out = out * 1.1 / max(np.sqrt(np.mean(out**2)), 1.1) / 5
            np.testing.assert_allclose(
                np.asarray(updates["w"]), out, rtol=1e-4, atol=1e-5 * np.abs(out).max()
            )
    if callable(prob):
        # p = 1 for steps 1, 2 (counter 1 >= 1), then p = 0.5: every 2nd step
        assert refreshed == [True, True, False, True, False, True, False, True, False, True]
    else:
        assert refreshed == [False, False, False, True] * 2 + [False, False]
        assert counters == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert int(state.count) == 10


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_probability_one_through_the_cond_matches_the_default_bit_for_bit(rule):
    # A schedule always at 1 takes the `lax.cond` path (a float 1.0 skips it), whose
    # refresh branch must compute exactly what the every-step update does.
    params = {"w": jnp.ones((9, 7)), "b": jnp.ones(7)}
    factory = getattr(wk, f"scale_by_{rule}")
    every_step = factory(dtype=jnp.float32)
    through_cond = factory(dtype=jnp.float32, preconditioner_update_probability=lambda t: 1.0)
    assert "cond" in str(jax.make_jaxpr(through_cond.update)(params, through_cond.init(params)))
    assert "cond" not in str(jax.make_jaxpr(every_step.update)(params, every_step.init(params)))
    sa, sb = every_step.init(params), through_cond.init(params)
    update_a, update_b = jax.jit(every_step.update), jax.jit(through_cond.update)
    for step in range(3):
        grads = {
            "w": jnp.cos(jnp.arange(63.0).reshape(9, 7) / (7 + step)),
            "b": jnp.linspace(-1.0, 1.0, 7) * (step + 1),
        }
        ua, sa = update_a(grads, sa)
        ub, sb = update_b(grads, sb)
        for x, y in zip(jax.tree.leaves((ua, sa)), jax.tree.leaves((ub, sb)), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(sb.factor_updates) == 3 and int(sb.update_counter) == 0
