"""`preconditioner_update_probability`: the deterministic counter scheme and its schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk


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


def test_probability_one_matches_the_default_bit_for_bit():
    params = {"w": jnp.ones((9, 7))}
    grads = {"w": jnp.arange(63.0).reshape(9, 7) / 63}
    a = wk.scale_by_skew(dtype=jnp.float32)
    b = wk.scale_by_skew(dtype=jnp.float32, preconditioner_update_probability=1.0)
    sa, sb = a.init(params), b.init(params)
    for _ in range(3):
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(grads, sb, params)
        np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))
