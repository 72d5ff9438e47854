"""`cache_preconditioner`: the stored sides `P = Q^T Q` give the outputs the factors
give, are the grams of the stored factors after every update (the rebalancing
included), are not stored when no step would read them, and survive a skipped step."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk
import wkron_eqx.testing as wkt

from .helpers import assert_trees_equal, normal_tree, run_steps


# Every kind: dense tiles with padding (12 = 8 + 4 in tiles of 8), a transposed tile, a
# large leaf (diagonal left, dense strips right), a leaf with both sides diagonal, a
# scanned stack, 1-D leaves and a scalar.
SHAPES = {
    "dense": (12, 8),
    "wide": (5, 12),
    "large": (40, 6),
    "huge": (40, 36),
    "stack": (3, 6, 8),
    "bias": (8,),
    "scale": (),
}
SCANNED = {k: k == "stack" for k in SHAPES}
COMMON = dict(
    block_size=8,
    max_size_dense=32,
    scanned_layers=SCANNED,
    dtype=jnp.float32,
    preconditioner_update_probability=0.5,
    b1=0.0,
)
RULES = {"quad": wk.scale_by_quad, "skew": wk.scale_by_skew}


def _tree(seed: int) -> dict:
    return normal_tree(SHAPES, seed)


def _run(tx, steps: int, state=None):
    """`steps` steps from params `_tree(0)` with gradients `_tree(1)`, `_tree(2)`, ..."""
    return run_steps(tx, _tree(0), [_tree(t + 1) for t in range(steps)], state=state)


def _factors(state):
    return state.dense, state.large, state.one_d


@pytest.mark.parametrize("rule", RULES)
def test_cached_steps_give_the_uncached_outputs(rule):
    """Same factors bit for bit (their update never reads the sides); outputs equal to
    float32 rounding on the steps that update and on those that only apply."""
    plain, plain_states = _run(RULES[rule](**COMMON), 6)
    cached, cached_states = _run(RULES[rule](cache_preconditioner=True, **COMMON), 6)
    updated = [int(s.factor_updates) for s in cached_states]
    assert updated == [0, 1, 1, 2, 2, 3]  # both kinds of step are in the run
    for a, b, sa, sb in zip(plain, cached, plain_states, cached_states, strict=True):
        assert_trees_equal(_factors(sa), _factors(sb))
        for k in SHAPES:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            np.testing.assert_allclose(y, x, rtol=0, atol=2e-6 * max(np.abs(x).max(), 1e-30))


def _gram(Q: np.ndarray) -> np.ndarray:
    Q = Q.astype(np.float64)
    return Q * Q if Q.ndim == 2 else np.swapaxes(Q, 1, 2) @ Q


def _assert_sides_are_grams(state):
    pairs = [(d.Ql, d.Qr, g) for d, g in zip(state.dense, state.cache.dense, strict=True)]
    pairs += [(s.Ql, s.Qr, g) for s, g in zip(state.large, state.cache.large, strict=True)]
    assert len(pairs) > len(state.dense)  # large leaves store sides too
    for Ql, Qr, grams in pairs:
        for Q, P in ((Ql, grams.Pl), (Qr, grams.Pr)):
            Q, P = np.asarray(Q), np.asarray(P)
            want = _gram(Q)
            np.testing.assert_allclose(P, want, rtol=0, atol=1e-5 * np.abs(want).max())
            # padding stays exactly zero: wherever the gram of the padded Q is zero
            assert np.all(P[want == 0] == 0)


@pytest.mark.parametrize("rule", RULES)
def test_stored_sides_are_the_grams_of_the_stored_factors(rule):
    tx = RULES[rule](cache_preconditioner=True, **COMMON)
    state = tx.init(_tree(0))
    _assert_sides_are_grams(state)  # of the initial factors
    # From step 99: step 100 rebalances each pair of factors, and updates them.
    state = state._replace(count=jnp.asarray(98, jnp.int32))
    _, states = _run(tx, 3, state=state)
    assert [int(s.factor_updates) for s in states] == [0, 1, 1]
    for s in states:
        _assert_sides_are_grams(s)


@pytest.mark.parametrize(
    "options, stored",
    [
        (dict(), False),
        (dict(cache_preconditioner=True), False),  # every step updates: nothing read
        (dict(cache_preconditioner=True, preconditioner_update_probability=0.5), True),
        (
            dict(
                cache_preconditioner=True,
                preconditioner_update_probability=wk.precond_update_prob_schedule(),
            ),
            True,
        ),
        (dict(preconditioner_update_probability=0.5), False),
    ],
)
def test_sides_are_stored_only_when_a_step_can_read_them(options, stored):
    state = jax.eval_shape(wk.scale_by_quad(**options).init, _tree(0))
    assert (state.cache is not None) is stored


@pytest.mark.parametrize("refresh", [True, False])
def test_a_skipped_step_keeps_the_sides(refresh):
    tx = wk.scale_by_quad(cache_preconditioner=True, **COMMON)
    params = _tree(0)
    update = jax.jit(tx.update)
    _, state = update(_tree(1), tx.init(params), params)  # counter at 1: the next updates
    if not refresh:
        _, state = update(_tree(2), state, params)
    bad = _tree(3)
    bad["dense"] = bad["dense"].at[0, 0].set(jnp.nan)
    _, after = update(bad, state, params)
    assert int(after.skipped_steps) == 1
    assert_trees_equal(after.cache, state.cache)
    assert_trees_equal(_factors(after), _factors(state))


def test_bfloat16_sides_give_the_bfloat16_outputs():
    """In bfloat16 storage each side is rounded once: outputs within a few bfloat16
    ulps of the ones from the factors."""
    options = dict(COMMON, dtype=jnp.bfloat16)
    plain, _ = _run(wk.scale_by_quad(**options), 4)
    cached, _ = _run(wk.scale_by_quad(cache_preconditioner=True, **options), 4)
    for a, b in zip(plain, cached, strict=True):
        for k in SHAPES:
            x, y = np.asarray(a[k], np.float32), np.asarray(b[k], np.float32)
            assert np.abs(y - x).max() <= 0.05 * max(np.abs(x).max(), 1e-30), k


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(tree=wkt.param_trees(block_size=8, max_leaves=3), seed=st.integers(0, 99))
def test_cached_apply_matches_over_shapes(tree, seed):
    """A step that only applies, from stored sides and from the factors, over drawn
    shapes (padding, strips, scanned stacks): the same outputs to float32 rounding."""
    params, scanned = tree
    options = dict(COMMON, scanned_layers=scanned, preconditioner_update_probability=1e-9)
    # Factors that are not the identity: one update with probability 1 first.
    start = wk.scale_by_quad(**dict(options, preconditioner_update_probability=1.0))
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    _, state = start.update(grads, start.init(params), params)
    moved = lambda s: s._replace(
        dense=state.dense, large=state.large, one_d=state.one_d, count=state.count
    )
    plain_tx = wk.scale_by_quad(**options)
    cached_tx = wk.scale_by_quad(cache_preconditioner=True, **options)
    cached_state = moved(cached_tx.init(params))
    # the moved factors' sides, from NumPy: the step must read them, not the factors
    cached_state = cached_state._replace(cache=_sides_of(cached_state))
    a, _ = plain_tx.update(grads, moved(plain_tx.init(params)), params)
    b, _ = cached_tx.update(grads, cached_state, params)
    for k in params:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        peak = np.abs(x).max() if x.size else 0.0  # (an empty leaf has none)
        np.testing.assert_allclose(y, x, rtol=0, atol=2e-6 * max(peak, 1e-30))


def _sides_of(state):
    """The `PreconditionerCache` of `state`'s factors, computed in NumPy."""
    side = lambda Q: jnp.asarray(_gram(np.asarray(Q)), jnp.float32)
    pairs = zip(state.dense, state.cache.dense, strict=True)
    dense = tuple(g._replace(Pl=side(d.Ql), Pr=side(d.Qr)) for d, g in pairs)
    large = tuple(
        g._replace(Pl=side(s.Ql), Pr=side(s.Qr))
        for s, g in zip(state.large, state.cache.large, strict=True)
    )
    return state.cache.__class__(dense=dense, large=large)


def test_a_cached_state_checkpoints_and_resumes_bit_identically(tmp_path):
    """`eqx.tree_serialise_leaves` round trip of a state holding sides, then two more
    steps (one applying, one updating) equal to the uninterrupted run; and
    `preconditioner_stats` reads the state."""
    import equinox as eqx

    tx = wk.scale_by_quad(cache_preconditioner=True, **COMMON)
    _, states = _run(tx, 5)
    path = tmp_path / "state.eqx"
    eqx.tree_serialise_leaves(path, states[2])
    restored = eqx.tree_deserialise_leaves(path, tx.init(_tree(0)))
    assert_trees_equal(restored, states[2])
    params, update = _tree(0), jax.jit(tx.update)
    state = restored
    for t in (3, 4):
        _, state = update(_tree(t + 1), state, params)
        assert_trees_equal(state, states[t])
    stats = wk.preconditioner_stats(state)
    assert set(stats) == set(SHAPES) and int(stats["large"]["kind"]) == wk.LARGE_PATH
