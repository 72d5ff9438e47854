"""`preconditioner_init_scale=None`: the factors start from each layer's first input.

The maths is checked against the NumPy re-derivation in `test_numpy_step.py`; here, the
edges: a zero or non-finite first input, a first step that would not update the factors,
and the size of the first update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import wkron_eqx as wk

from .helpers import assert_trees_equal


_PARAMS = {"w": jnp.ones((12, 8)), "b": jnp.ones(8), "stack": jnp.ones((2, 6, 6))}
_SCANNED = {"w": False, "b": False, "stack": True}


def _tx(init, **kwargs):
    return wk.scale_by_skew(
        dtype=jnp.float32,
        block_size=8,
        scanned_layers=_SCANNED,
        preconditioner_init_scale=init,
        lr_style=None,
        **kwargs,
    )


def _grads(scale=1e-3, seed=0):
    leaves, treedef = jax.tree.flatten(_PARAMS)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@functools.cache
def _compiled(init, probability):
    tx = _tx(init, preconditioner_update_probability=probability)
    return tx.init, jax.jit(tx.update)


def _step(init, grads, state=None, probability=1.0):
    init_fn, update = _compiled(init, probability)
    return update(grads, init_fn(_PARAMS) if state is None else state)


def _rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_the_first_update_has_unit_rms_whatever_the_gradient_scale():
    """Each layer's sides are scaled by the RMS of its first input, and the factors take
    no step on that first step: `Pl G Pr` is `G / rms(G)`."""
    for scale in (1e-6, 1e-3, 1e2):
        grads = _grads(scale)
        updates, _ = _step(None, grads)
        for name, u in updates.items():
            layers = (u, grads[name]) if name == "stack" else (u[None], grads[name][None])
            for layer, g in zip(*layers, strict=True):
                np.testing.assert_allclose(layer, g / _rms(g), rtol=2e-5, atol=1e-6)
    # From the identity, the first update is as small as the gradient.
    updates, _ = _step(1.0, _grads(1e-3))
    assert max(_rms(u) for u in updates.values()) < 1e-2


def test_a_zero_first_input_leaves_its_leaf_at_scale_one():
    grads = dict(_grads(), w=jnp.zeros((12, 8)))
    _, started = _step(None, grads)
    plain = _tx(None).init(_PARAMS)  # the identity start (the first step takes no step)
    w = started.leaf_tree()["w"]
    assert w.kind == wk.DENSE_PATH and w.B == 1
    # The tiles of `w` are 8 x 8 and 4 x 8, the stack's 6 x 6 (they may share a bucket).
    for ours, ref in zip(started.dense, plain.dense, strict=True):
        for i in range(ours.valid_count):
            of_w = (int(ours.valid_rows[i]), int(ours.valid_cols[i])) != (6, 6)
            same = np.array_equal(ours.Ql[i], ref.Ql[i]) and np.array_equal(ours.Qr[i], ref.Qr[i])
            assert same == of_w
    assert not np.allclose(started.leaf_tree()["b"].Ql, plain.leaf_tree()["b"].Ql)


def test_a_non_finite_first_input_is_skipped_and_the_next_one_starts_the_factors():
    bad = dict(_grads(), w=_grads()["w"].at[0, 0].set(jnp.nan))
    updates, skipped = _step(None, bad)
    assert int(skipped.count) == 0 and int(skipped.skipped_steps) == 1
    assert all(not np.any(u) for u in jax.tree.leaves(updates))
    fresh = _tx(None).init(_PARAMS)
    assert_trees_equal(skipped.dense, fresh.dense)
    good = _grads(seed=1)
    after, state = _step(None, good, skipped)
    expected, expected_state = _step(None, good)
    assert_trees_equal(after, expected)
    assert_trees_equal(state.dense, expected_state.dense)
    assert_trees_equal(state.leaf_states(), expected_state.leaf_states())


def test_the_first_step_updates_the_factors_even_when_the_schedule_would_not():
    grads = _grads()
    updates, state = _step(None, grads, probability=0.1)
    every_step, _ = _step(None, grads)
    assert int(state.factor_updates) == 1 and int(state.update_counter) == 0
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(every_step), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(e), rtol=1e-6, atol=1e-9)
    # From a given scale the schedule decides alone (the reference's behaviour).
    _, state = _step(1.0, grads, probability=0.1)
    assert int(state.factor_updates) == 0
