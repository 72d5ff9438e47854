"""Reliability: a non-finite step is skipped and counted;
zero, tiny and huge gradients leave the state finite; empty and 0-d leaves pass through;
a mismatched tree or `scanned_layers` is refused naming the leaf; `preconditioner_lr`
below 0.4 is honoured; `init`/`update` are pure and deterministic; long bfloat16 runs
keep learning.

Compiling a step dominates the cost here, so the jitted steps of the tree that holds every
leaf kind are built once per configuration (`_kinds`) and shared by the tests.
"""

import dataclasses
import functools

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wkron_eqx as wk
import wkron_eqx.testing as wkt

from .helpers import assert_bit_identical


SCALE_BY = {"quad": wk.scale_by_quad, "skew": wk.scale_by_skew}
OPTIMIZERS = {"quad": wk.quad, "skew": wk.skew}

# Every leaf kind: dense tiles, a large leaf (diagonal left, dense right strips), a vector,
# a 0-d scalar, an empty leaf and a scanned stack of two 4 x 3 layers.
_KINDS_SHAPES = {
    "dense": (12, 5),
    "large": (40, 3),
    "bias": (5,),
    "scalar": (),
    "empty": (0,),
    "stack": (2, 4, 3),
}
_KINDS_SCANNED = {name: name == "stack" for name in _KINDS_SHAPES}
_KINDS_CONFIG = dict(
    block_size=8, max_size_dense=16, scanned_layers=_KINDS_SCANNED, noise_scale=0.0
)


def _random_tree(shapes, seed: int, dtype) -> dict:
    rng = np.random.default_rng(seed)
    return {
        name: jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
        for name, shape in shapes.items()
    }


@functools.cache
def _kinds(rule: str, dtype_name: str):
    """`(tx, jitted update, init state)` for the every-kind tree; the gradients and the
    optimizer share the dtype."""
    dtype = jnp.dtype(dtype_name)
    tx = SCALE_BY[rule](dtype=dtype, **_KINDS_CONFIG)
    return tx, jax.jit(tx.update), tx.init(_random_tree(_KINDS_SHAPES, 0, dtype))


def _kinds_grads(seed: int, dtype_name: str, scale: float = 1.0) -> dict:
    tree = _random_tree(_KINDS_SHAPES, seed, jnp.float32)
    return jax.tree.map(lambda g: (scale * g).astype(dtype_name), tree)


def _snapshot(tree):
    """A deep copy (NumPy copies of every leaf, new containers) to compare a tree with
    after a call: equal to it exactly when the call left the tree as it was."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_kept(kept, before):
    """`kept` is the state `before` was a snapshot of, but for one more skipped step,
    reported as the latest step's verdict."""
    assert _skipped(kept) == _skipped(before) + 1
    assert bool(kept.last_step_skipped)
    restored = kept._replace(
        skipped_steps=before.skipped_steps, last_step_skipped=before.last_step_skipped
    )
    assert_bit_identical(restored, before)


def _float_leaves(tree) -> list[np.ndarray]:
    return [
        np.asarray(x, np.float32)
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(x)) for x in _float_leaves(tree))


def _skipped(state) -> int:
    return int(optax.tree_utils.tree_get(state, "skipped_steps"))


def _count(state) -> int:
    return int(optax.tree_utils.tree_get(state, "count"))


def _assert_real_update(updates, grads):
    """Finite, of the gradients' shapes and dtypes, and non-zero in every non-empty leaf."""
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        assert u.shape == g.shape and u.dtype == g.dtype
        if u.size:
            assert np.all(np.isfinite(np.asarray(u, np.float32)))
            assert np.any(np.asarray(u, np.float32) != 0)


def _assert_zero_update(updates, grads):
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        assert u.shape == g.shape and u.dtype == g.dtype
        np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)


def _one_d_closed_form(rule: str, g: np.ndarray, lr: float, q: float = 1.0):
    """One step of a fresh 1-D factor (`b1=0`, no noise, `lr_style=None`), in float64:
    `A = (q^2 g)^2`, `L = max(A) + 1` at step 1, `q' = q (1 - z(A - 1))^2` with
    `z = lr / (2L)` (QUAD) or `q' = q (1 - z(A - 1))` with `z = lr / L` (Procrustes), then
    `u = q'^2 g` with its RMS clipped to 1.1. Returns `(q', u)`."""
    g = np.asarray(g, np.float64).reshape(-1)
    A = (q * q * g) ** 2
    L = np.max(A) + 1.0
    if rule == "quad":
        q_new = q * (1 - lr / (2 * L) * (A - 1)) ** 2
    else:
        q_new = q * (1 - lr / L * (A - 1))
    u = q_new * q_new * g
    rms = np.sqrt(np.mean(u * u))
    return q_new, u * 1.1 / max(rms, 1.1)


# ---------------------------------------------------------------------------------------
# A non-finite gradient skips the step; training then continues as if it never came.


@functools.cache
def _trained(rule: str):
    """The every-kind state after two good steps, and three good gradients to go on with."""
    _, update, state = _kinds(rule, "bfloat16")
    for seed in (1, 2):
        _, state = update(_kinds_grads(seed, "bfloat16"), state)
    return state, [_kinds_grads(seed, "bfloat16") for seed in (3, 4, 5)]


def _continue(update, state, grads):
    out = []
    for g in grads:
        updates, state = update(g, state)
        out.append(updates)
    return out, state


@pytest.mark.fast
@pytest.mark.parametrize("rule", ["quad", "skew"])
@hypothesis.settings(max_examples=12)
@hypothesis.given(data=st.data())
def test_nonfinite_gradient_is_skipped_and_counted(rule, data):
    _, update, _ = _kinds(rule, "bfloat16")
    state, good = _trained(rule)
    # NaN/+inf/-inf at drawn positions of drawn leaves (any kind, the scanned stack too).
    bad = data.draw(wkt.nonfinite_gradients(good[0]), label="bad gradient")

    before = _snapshot(state)
    updates, kept = update(bad, state)
    _assert_zero_update(updates, bad)
    # `count` does not advance on a skipped step (so the noise key and the every-100-steps
    # balancing stay on the schedule of the steps actually taken) ...
    assert _count(kept) == _count(before) == 2
    # ... and momentum, factors, Lipschitz estimates and counters are kept bit for bit.
    _assert_kept(kept, before)
    assert_bit_identical(state, before)

    # Training continues exactly as if the bad step had never come.
    after_skip, final = _continue(update, kept, good)
    without, final_without = _continue(update, state, good)
    assert_bit_identical(after_skip, without)
    assert not bool(final.last_step_skipped)
    assert_bit_identical(final._replace(skipped_steps=state.skipped_steps), final_without)
    assert _skipped(final) == 1 and _count(final) == 5
    for u in after_skip:
        _assert_real_update(u, good[0])


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_skipped_step_is_all_zero_through_the_full_optimizer(rule):
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones((5,))}
    schedule = optax.linear_schedule(0.1, 0.0, 100)
    tx = OPTIMIZERS[rule](learning_rate=schedule, weight_decay=0.1, block_size=8)
    state = tx.init(params)
    bad = {"w": jnp.ones((6, 5)), "b": jnp.array([1.0, jnp.nan, 1.0, 1.0, 1.0])}
    updates, new_state = jax.jit(tx.update)(bad, state, params)
    assert _skipped(new_state) == 1
    _assert_zero_update(updates, bad)
    # The schedule's step count is kept too: the skipped step is not a step.
    assert [int(c) for c in jax.tree.leaves(new_state[1:])] == [0]


# ---------------------------------------------------------------------------------------
# Zero, tiny and huge gradients.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_zero_tiny_and_huge_gradients_never_poison_the_state(dtype, scale):
    _, update, state = _kinds("quad", dtype)
    grads = _kinds_grads(1, dtype, scale)
    before = _snapshot(state)
    updates, new_state = update(grads, state)
    assert _all_finite(new_state)
    if scale == 0.0:
        # A frozen layer: a zero update, and a real step (the factors grow, L = c).
        _assert_zero_update(updates, grads)
        assert _skipped(new_state) == 0 and _count(new_state) == 1
    elif scale == 1e-30:
        # Tiny: A underflows to 0, but the output `q'^2 g` is representable and non-zero.
        _assert_real_update(updates, grads)
        assert _skipped(new_state) == 0 and _count(new_state) == 1
    else:
        # Huge: A = (Pg)^2 ~ 1e60 overflows in both dtypes: skipped, never stored.
        _assert_zero_update(updates, grads)
        assert _count(new_state) == 0
        _assert_kept(new_state, before)
    # The next real gradient gets a real, finite update.
    real = _kinds_grads(2, dtype)
    updates, next_state = update(real, new_state)
    _assert_real_update(updates, real)
    assert _all_finite(next_state)
    assert _skipped(next_state) == _skipped(new_state)
    assert _count(next_state) == _count(new_state) + 1


@pytest.mark.fast
@pytest.mark.parametrize("rule", ["quad", "skew"])
@pytest.mark.parametrize("leaf", ["dense", "large", "bias", "scalar", "stack"])
def test_a_statistic_that_overflows_skips_the_step(rule, leaf):
    # One leaf's gradient is huge but finite (1e24, as is the bias-corrected momentum):
    # its statistic `A = Pg Pg^T` (or `Pg^2`) overflows to inf, which makes the new factors
    # and the output non-finite. The whole step is skipped and the state kept bit for bit;
    # the next step is the one the state would have taken without it.
    _, update, _ = _kinds(rule, "bfloat16")
    state, good = _trained(rule)
    bad = dict(good[0])
    bad[leaf] = (bad[leaf].astype(jnp.float32) * 1e24).astype(jnp.bfloat16)
    assert np.all(np.isfinite(np.asarray(bad[leaf], np.float32)))
    before = _snapshot(state)
    updates, kept = update(bad, state)
    _assert_zero_update(updates, bad)
    _assert_kept(kept, before)
    assert_bit_identical(update(good[1], kept)[0], update(good[1], state)[0])


# ---------------------------------------------------------------------------------------
# Empty and 0-d leaves.


@st.composite
def _edge_trees(draw):
    """Trees of empty leaves (a drawn shape with one side set to 0, or a scanned stack of
    0 layers), 0-d leaves, and a `(3,)` vector; with the matching `scanned_layers`."""
    shapes, scanned = {}, {}
    for i in range(draw(st.integers(1, 4))):
        form = draw(st.sampled_from(["empty", "scalar", "no_layers", "empty_layers"]))
        flag = form in ("no_layers", "empty_layers")
        if form == "scalar":
            shape = ()
        else:
            shape = draw(wkt.leaf_shapes(4, min_dims=1, max_dims=3, allow_empty=False))
            if form == "no_layers":
                shape = (0,) + shape
            else:
                axis = draw(st.integers(0, len(shape) - 1))
                shape = shape[:axis] + (0,) + shape[axis + 1 :]
                if form == "empty_layers":
                    shape = (draw(st.integers(1, 2)),) + shape
        shapes[f"e{i}"], scanned[f"e{i}"] = shape, flag
    shapes["v"], scanned["v"] = (3,), False
    return shapes, scanned


_ISSUE_EDGES = (
    {"a": (0,), "b": (0, 5), "c": (3, 0, 4), "s": ()},
    {"a": False, "b": False, "c": False, "s": False},
)


@hypothesis.settings(max_examples=5)
@hypothesis.example(tree=_ISSUE_EDGES, rule="quad", seed=0)
@hypothesis.example(tree=_ISSUE_EDGES, rule="skew", seed=1)
@hypothesis.given(
    tree=_edge_trees(), rule=st.sampled_from(["quad", "skew"]), seed=st.integers(0, 2**16)
)
def test_empty_and_scalar_leaves_pass_through(tree, rule, seed):
    shapes, scanned = tree
    params = _random_tree(shapes, seed, jnp.float32)
    grads = _random_tree(shapes, seed + 1, jnp.float32)
    tx = SCALE_BY[rule](
        b1=0.0, lr_style=None, noise_scale=0.0, dtype=jnp.float32, scanned_layers=scanned
    )
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    assert _skipped(new_state) == 0 and _count(new_state) == 1
    for name, g in grads.items():
        u = updates[name]
        assert u.shape == g.shape and u.dtype == g.dtype
        if g.size:
            # 0-d leaves and the vector are 1-D leaves, each with its own L: closed form.
            lr = 0.7 / np.sqrt(1 + 1 / 10000)  # the default, decayed at t = 1
            _, expected = _one_d_closed_form(rule, np.asarray(g), lr)
            np.testing.assert_allclose(np.asarray(u).reshape(-1), expected, rtol=2e-5)


# ---------------------------------------------------------------------------------------
# A gradient tree that does not match the state is refused at trace time.


def _mismatch_state():
    params = {"a": {"w": jnp.ones((6, 5))}, "b": jnp.ones((5,))}
    tx = wk.quad(block_size=8)
    return tx, tx.init(params), params


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "grads, error, words",
    [
        (
            {"a": {"w": jnp.ones((5, 6))}, "b": jnp.ones((5,))},
            ValueError,
            ["['a']['w']", "(5, 6)", "(6, 5)"],
        ),
        ({"a": {"w": jnp.ones((6, 5))}, "b": jnp.ones(())}, ValueError, ["['b']", "()", "(5,)"]),
        (
            {"a": {"w": jnp.ones((6, 5), jnp.int32)}, "b": jnp.ones((5,))},
            TypeError,
            ["['a']['w']", "int32"],
        ),
        (
            {"a": {"w": jnp.ones((6, 5))}, "b": jnp.ones((5,), jnp.bool_)},
            TypeError,
            ["['b']", "bool"],
        ),
    ],
    ids=["shape", "0-d", "int32", "bool"],
)
def test_leaf_of_another_shape_or_dtype_is_refused_naming_it(grads, error, words, jit):
    tx, state, params = _mismatch_state()
    update = jax.jit(tx.update) if jit else tx.update
    # Exactly this Python exception, raised while tracing: no XLA error.
    with pytest.raises(error) as info:
        update(grads, state, params)
    assert type(info.value) is error
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "grads, words",
    [
        ({"a": {"w": jnp.ones((6, 5))}, "b": jnp.ones(5), "c": jnp.ones(3)}, ["['c']"]),
        ({"a": {"w": jnp.ones((6, 5))}}, ["['b']", "(5,)"]),
        ({"a": {"v": jnp.ones((6, 5))}, "b": jnp.ones(5)}, ["['a']['v']", "['a']['w']"]),
        ({"a": {"w": {"x": jnp.ones((6, 5))}}, "b": jnp.ones(5)}, ["['a']['w']['x']"]),
        ({"a": jnp.ones((6, 5)), "b": jnp.ones(5)}, ["['a']['w']", "(6, 5)"]),
    ],
    ids=["extra", "missing", "renamed", "deeper", "shallower"],
)
def test_tree_of_another_structure_is_refused_naming_the_leaf(grads, words, jit):
    tx, state, params = _mismatch_state()
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError) as info:
        update(grads, state, params)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------
# A `scanned_layers` tree that does not fit the params is refused naming the leaf.


@st.composite
def _bad_scanned(draw):
    """A params tree, a `scanned_layers` tree that does not fit it, and what the error
    must name."""
    params, scanned = draw(wkt.param_trees(4, max_leaves=3, allow_scanned=True))
    params = dict(params, s=jnp.ones(()))
    scanned = dict(scanned, s=False)
    name = draw(st.sampled_from(sorted(params)))
    how = draw(st.sampled_from(["flag_0d", "deeper", "extra", "not_bool"]))
    if how == "flag_0d":
        name = "s"
        scanned["s"] = True
        return params, scanned, [f"['{name}']", "leading axis"]
    if how == "deeper":
        scanned[name] = {"x": True}
        return params, scanned, [f"['{name}']"]
    if how == "extra":
        scanned["zz_not_a_param"] = True
        return params, scanned, ["zz_not_a_param"]
    scanned[name] = "yes"
    return params, scanned, [f"['{name}']", "'yes'"]


@hypothesis.given(case=_bad_scanned(), rule=st.sampled_from(["quad", "skew"]))
def test_scanned_layers_that_do_not_fit_are_refused_naming_the_leaf(case, rule):
    params, scanned, words = case
    tx = OPTIMIZERS[rule](scanned_layers=scanned, block_size=4)
    with pytest.raises(ValueError) as info:
        tx.init(params)
    message = str(info.value)
    assert "`scanned_layers`" in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------------------------------
# preconditioner_lr below 0.4 is honoured (the reference clamps it to 0.4).


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_small_preconditioner_lr_is_honoured(rule):
    g = np.array([0.3, -1.2, 2.5, 0.05, -0.7, 1.6, 0.0], np.float32)
    factors = {}
    for lr in (0.1, 0.4):
        tx = SCALE_BY[rule](
            preconditioner_lr=lr, b1=0.0, lr_style=None, noise_scale=0.0, dtype=jnp.float32
        )
        state = tx.init({"v": jnp.zeros(7)})
        updates, new_state = jax.jit(tx.update)({"v": jnp.asarray(g)}, state)
        # At t = 1, `max(lr / sqrt(1 + 1e-4), min(lr, 0.4))` is exactly `lr` for both.
        q_expected, u_expected = _one_d_closed_form(rule, g, lr)
        q = np.asarray(new_state.leaf_tree()["v"].Ql[0])
        np.testing.assert_allclose(q, q_expected, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(updates["v"]), u_expected, rtol=1e-6)
        np.testing.assert_allclose(float(new_state.leaf_tree()["v"].Ll[0]), np.max(g**2) + 1, 1e-6)
        factors[lr] = q
    # The reference would give 0.4's factors for 0.1: ours differ, by about 4x the step.
    step_small, step_large = np.abs(factors[0.1] - 1), np.abs(factors[0.4] - 1)
    assert np.all(step_small[g != 0] < 0.5 * step_large[g != 0])


# ---------------------------------------------------------------------------------------
# Purity: nothing passed in is changed or kept.


def test_init_never_keeps_the_callers_arrays():
    tx, update, _ = _kinds("quad", "bfloat16")
    params = _random_tree(_KINDS_SHAPES, 7, jnp.bfloat16)
    state = tx.init(params)
    # No state leaf is (or shares the buffer of) a params leaf ...
    param_leaves = [p for p in jax.tree.leaves(params) if p.size]
    buffers = {p.unsafe_buffer_pointer() for p in param_leaves}
    for leaf in jax.tree.leaves(state):
        assert all(leaf is not p for p in param_leaves)
        assert leaf.size == 0 or leaf.unsafe_buffer_pointer() not in buffers
    # ... so deleting the params leaves a working state, equal to a fresh one.
    for p in jax.tree.leaves(params):
        p.delete()
    fresh = tx.init(_random_tree(_KINDS_SHAPES, 8, jnp.bfloat16))
    assert_bit_identical(state, fresh)
    grads = _kinds_grads(3, "bfloat16")
    assert_bit_identical(update(grads, state), update(grads, fresh))
    _assert_real_update(update(grads, state)[0], grads)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_update_never_mutates_state_gradients_or_params(jit):
    # Eager is where an in-place change would show (the reference's does). The full
    # optimizer (weight decay reads the params) on 1-D leaves: eager steps compile op by op,
    # and test_update covers an eager step of every kind. Jitted: every kind.
    if jit:
        # (`scale_by_quad` does not read the params; the compiled step is the shared one.)
        _, jitted, state = _kinds("quad", "bfloat16")
        grads = _kinds_grads(3, "bfloat16")
        params = _random_tree(_KINDS_SHAPES, 0, jnp.bfloat16)
        update = lambda grads, state, params: jitted(grads, state)
    else:
        params = {"b": jnp.linspace(-1.0, 1.0, 5), "s": jnp.ones(())}
        grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.5, params)
        tx = wk.quad(learning_rate=0.1, weight_decay=0.1)
        update, state = tx.update, tx.init(params)
    before = _snapshot((params, grads, state))
    updates, new_state = update(grads, state, params)
    assert_bit_identical((params, grads, state), before)
    assert new_state is not state
    assert _count(new_state) == 1 and _count(state) == 0
    _assert_real_update(updates, grads)
    # Nothing returned shares a mutable container (a dict, a list) with what was passed
    # in, so changing the returned state in place cannot reach the caller's.
    assert not _containers(updates, new_state) & _containers(params, grads, state)
    # Updating from the same state again gives the same step, bit for bit.
    assert_bit_identical(update(grads, state, params), (updates, new_state))


def _containers(*trees) -> set[int]:
    """The ids of the mutable containers (dicts, lists) anywhere in `trees`, Modules and
    tuples included."""
    found: set[int] = set()

    def visit(x):
        if isinstance(x, dict | list):
            found.add(id(x))
            for v in x.values() if isinstance(x, dict) else x:
                visit(v)
        elif isinstance(x, tuple):
            for v in x:
                visit(v)
        elif isinstance(x, eqx.Module):
            for field in dataclasses.fields(x):
                visit(getattr(x, field.name))

    for tree in trees:
        visit(tree)
    return found


def test_the_purity_checks_catch_a_reference_style_update():
    # An update in the reference's style writes the new momentum into the state it was
    # given and returns that state's containers: both checks above reject it.
    tx, jitted, _ = _kinds("quad", "bfloat16")
    state = tx.init(_random_tree(_KINDS_SHAPES, 0, jnp.bfloat16))
    grads = _kinds_grads(3, "bfloat16")

    def reference_style(grads, state):
        updates, new = jitted(grads, state)
        state.mu.update(new.mu)
        return updates, state._replace(count=new.count)

    before = _snapshot(state)
    updates, new_state = reference_style(grads, state)
    with pytest.raises(AssertionError):
        assert_bit_identical(state, before)
    assert _containers(updates, new_state) & _containers(grads, state)


# ---------------------------------------------------------------------------------------
# Long bfloat16 runs stay finite and keep learning.

_DIGITS_STEPS, _DIGITS_BATCH, _DIGITS_HIDDEN, _DIGITS_LR = 2000, 128, 32, 3e-3


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    n_train = 1347
    batches = np.concatenate(
        [
            np.random.default_rng(epoch).permutation(n_train)[: 10 * _DIGITS_BATCH]
            for epoch in range(_DIGITS_STEPS // 10 + 1)
        ]
    ).reshape(-1, _DIGITS_BATCH)[:_DIGITS_STEPS]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), batches


def _mlp_logits(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return hidden @ params["w2"] + params["b2"][None, :]


def _mlp_loss(params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_mlp_logits(params, x), y))


def _train_digits(rule: str, dtype):
    (x_train, y_train), (x_test, y_test), batches = _digits()
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.standard_normal((64, _DIGITS_HIDDEN), np.float32) / 8),
        "b1": jnp.zeros(_DIGITS_HIDDEN),
        "w2": jnp.asarray(
            rng.standard_normal((_DIGITS_HIDDEN, 10), np.float32) / np.sqrt(_DIGITS_HIDDEN)
        ),
        "b2": jnp.zeros(10),
    }
    tx = OPTIMIZERS[rule](learning_rate=_DIGITS_LR, weight_decay=0.0, dtype=dtype)
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

    def body(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x_train[batch], y_train[batch])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    # One compiled program for all the steps.
    run = jax.jit(lambda params, state, batches: jax.lax.scan(body, (params, state), batches))
    (params, state), losses = run(params, tx.init(params), jnp.asarray(batches))
    train_loss = float(_mlp_loss(params, x_train, y_train))
    accuracy = float(np.mean(np.argmax(_mlp_logits(params, x_test), -1) == y_test))
    return np.asarray(losses), train_loss, 100 * accuracy, _skipped(state), params


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_long_bfloat16_run_stays_finite_and_learns(rule):
    results = {dtype: _train_digits(rule, dtype) for dtype in (jnp.float32, jnp.bfloat16)}
    for losses, train_loss, _, skipped, params in results.values():
        assert skipped == 0
        assert np.all(np.isfinite(losses)) and _all_finite(params)
        assert train_loss < 0.05
        # Still learning late in the run: the last 100 minibatches beat steps 400-500.
        assert losses[-100:].mean() < 0.5 * losses[400:500].mean()
    accuracy_f32, accuracy_bf16 = results[jnp.float32][2], results[jnp.bfloat16][2]
    assert accuracy_f32 > 95
    assert abs(accuracy_bf16 - accuracy_f32) <= 1.5


# ---------------------------------------------------------------------------------------
# Determinism: the noise keys derive from the step, nothing else.


def test_same_inputs_give_bit_identical_results():
    shapes = {"w": (6, 5), "b": (5,), "s": ()}
    params = _random_tree(shapes, 0, jnp.float32)
    grads = [_random_tree(shapes, seed, jnp.float32) for seed in (1, 2, 3)]

    def run(update, state):
        out = []
        for g in grads:
            updates, state = update(g, state)
            out.append(updates)
        return out, state

    runs = {}
    for noise_scale in (1e-9, 1e-2):  # the default, and one the bfloat16 maths can see
        # Two optimizers built and traced independently lower to the same program (no
        # trace-time randomness) ...
        txs = [wk.scale_by_quad(noise_scale=noise_scale, block_size=8) for _ in range(2)]
        states = [tx.init(params) for tx in txs]
        assert_bit_identical(states[0], states[1])
        lowered = [jax.jit(tx.update).lower(grads[0], s) for tx, s in zip(txs, states, strict=True)]
        assert lowered[0].as_text() == lowered[1].as_text()
        # ... whose repeated runs are bit-identical.
        update = lowered[0].compile()
        runs[noise_scale] = run(update, states[0])
        assert_bit_identical(runs[noise_scale], run(update, states[1]))
        assert_bit_identical(runs[noise_scale], run(update, txs[0].init(params)))
    # The noise is really drawn: determinism above is not for lack of noise.
    default, noisy = runs[1e-9][1].dense, runs[1e-2][1].dense
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(_float_leaves(default), _float_leaves(noisy), strict=True)
    )
