"""Properties of `update` as a function: it trains, compiles once, is pure, keeps the
state's structure (so `lax.scan` works), treats each leaf independently of the others with
inert padding, and reads `scanned_layers` as a prefix tree."""

import dataclasses

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import optimistix as optx
import pytest

import wkron_eqx as wk
import wkron_eqx.testing as wkt


OPTIMIZERS = {"quad": wk.quad, "skew": wk.skew}
SCALE_BY = {"quad": wk.scale_by_quad, "skew": wk.scale_by_skew}


def _tree_numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_trees_equal(a, b):
    """Same structure (static fields included), dtypes and bits."""
    leaves_a, treedef_a = jax.tree.flatten(a)
    leaves_b, treedef_b = jax.tree.flatten(b)
    assert treedef_a == treedef_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------
# (a) training compiles once and works


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_training_step_compiles_once_and_fits(rule):
    key_model, key_teacher, key_x = jr.split(jr.key(0), 3)
    model = eqx.nn.MLP(4, 2, width_size=16, depth=2, activation=jnp.tanh, key=key_model)
    teacher = eqx.nn.MLP(4, 2, width_size=8, depth=1, activation=jnp.tanh, key=key_teacher)
    x = jr.normal(key_x, (256, 4))
    y = jax.vmap(teacher)(x)
    tx = OPTIMIZERS[rule](learning_rate=3e-2, weight_decay=0.0)  # bfloat16 factors

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    start = float(loss_fn(model, x, y))
    for _ in range(100):
        model, opt_state, _ = step(model, opt_state, x, y)
    final = float(loss_fn(model, x, y))
    assert np.isfinite(final) and final < 0.05 * start


# ---------------------------------------------------------------------------------------
# (b) an ill-conditioned quadratic through optimistix


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_optimistix_ill_conditioned_quadratic(rule):
    # f(Y) = 1/2 tr(Y^T A Y B) with cond(A) = cond(B) ~ 32: the Hessian A (x) B has
    # condition number ~ 1e3 and exactly the Kronecker structure the preconditioner fits.
    rng = np.random.default_rng(0)
    rot_a, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    rot_b, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = jnp.asarray(rot_a @ np.diag(np.logspace(0, 1.5, 8)) @ rot_a.T, jnp.float32)
    B = jnp.asarray(rot_b @ np.diag(np.logspace(0, 1.5, 6)) @ rot_b.T, jnp.float32)
    assert 5e2 < np.linalg.cond(np.kron(A, B)) < 2e3

    def fn(y, args):
        del args
        return 0.5 * jnp.sum(y * (A @ y @ B))

    y0 = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)

    def schedule(count):
        # A geometric decay from 1 to 1e-3 over 300 steps (optax's own schedules mix int32
        # and float under strict dtype promotion).
        return jnp.asarray(1e-3, jnp.float32) ** (count.astype(jnp.float32) / 300)

    tx = OPTIMIZERS[rule](
        learning_rate=schedule, weight_decay=0.0, dtype=jnp.float32, noise_scale=0.0
    )
    solver = optx.OptaxMinimiser(tx, rtol=1e-7, atol=1e-7)
    solution = optx.minimise(fn, solver, y0, max_steps=300, throw=False)
    assert float(fn(solution.value, None)) < 1e-6 * float(fn(y0, None))
    assert float(jnp.max(jnp.abs(solution.value))) < 1e-2


# ---------------------------------------------------------------------------------------
# (c) purity


def test_update_leaves_callers_state_untouched():
    # Eager (no jit), where an in-place change would show. The rule does not matter here
    # (the reference's mutation is in its transform), and eager steps are slow: QUAD only.
    params = {"w": jnp.ones((12, 5)), "big": jnp.ones((40, 3)), "b": jnp.ones((5,))}
    grads = jax.tree.map(lambda p: 0.1 * p + jnp.arange(p.size).reshape(p.shape) / 7, params)
    tx = wk.quad(learning_rate=0.1, max_size_dense=16, block_size=8)
    state = tx.init(params)
    state_copy = _tree_numpy(state)
    grads_copy = _tree_numpy(grads)
    updates, new_state = tx.update(grads, state, params)
    assert new_state is not state
    _assert_trees_equal(state, state_copy)
    _assert_trees_equal(grads, grads_copy)
    # ... and the step did happen: the new state moved on.
    assert int(new_state[0].count) == 1 and int(state[0].count) == 0
    assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
    # Updating from the same state again gives the same result.
    _assert_trees_equal(tx.update(grads, state, params), (updates, new_state))


# ---------------------------------------------------------------------------------------
# (d) leaves are independent; padding stays exactly zero


@st.composite
def _configs(draw: st.DrawFn) -> dict:
    """A rule, a block size and a `max_size_dense` that makes some drawn leaves LARGE."""
    block_size = draw(wkt.block_sizes())
    return {
        "rule": draw(st.sampled_from(["quad", "skew"])),
        "block_size": block_size,
        "max_size_dense": draw(st.integers(block_size, 3 * block_size)),
    }


def _scan_steps(tx, grads: dict[str, np.ndarray]):
    """Updates from `grads` (`[steps, *shape]` per leaf) under one jitted `lax.scan`;
    returns the updates of every step (a dict like `grads`) and the final state.

    (Not `helpers.run_steps`, which jits one step per gradient tree: these properties
    are checked on the scanned program, which rounds differently, and a 101-step run is
    one dispatch.)"""
    state = tx.init({k: jnp.zeros(g.shape[1:]) for k, g in grads.items()})

    def body(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    state, updates = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(
        state, {k: jnp.asarray(g) for k, g in grads.items()}
    )
    return updates, state


def _gradients(params: dict[str, jax.Array], steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal((steps,) + p.shape).astype(np.float32) for k, p in params.items()
    }


# Every example compiles its own step, so examples are few and failures are not shrunk
# (shrinking would recompile hundreds of times).
_JITTED_PROPERTY = hypothesis.settings(
    max_examples=3,
    phases=(hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate),
)


@st.composite
def _leaf_and_others(draw: st.DrawFn):
    """A config, a non-empty target leaf `(array, scanned)` and a tree of other leaves."""
    config = draw(_configs())
    leaf, flag = draw(wkt.param_trees(config["block_size"], max_leaves=1, allow_empty=False))
    others = draw(wkt.param_trees(config["block_size"], max_leaves=3))
    return config, (leaf["w0"], flag["w0"]), others


def _zeros(shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s) for k, s in shapes.items()}


@_JITTED_PROPERTY
@hypothesis.given(case=_leaf_and_others())
@hypothesis.example(  # a LARGE target with edge strips among dense, scanned and 1-D leaves
    case=(
        {"rule": "skew", "block_size": 8, "max_size_dense": 20},
        (jnp.zeros((21, 19)), False),
        (
            _zeros({"w0": (3, 9, 10), "w1": (7,), "w2": (17, 9)}),
            {"w0": True, "w1": False, "w2": False},
        ),
    )
)
def test_leaf_update_does_not_depend_on_other_leaves(case):
    config, (leaf, flag), (others, others_scanned) = case
    config = dict(config)
    rule = config.pop("rule")
    # Keys sort as w0 < target < w1 < w2: the leaf sits after the first other leaf.
    target = "w0_target"
    leaf_grads = _gradients({target: leaf}, steps=3)
    tree_grads = {**_gradients(others, steps=3, seed=1), **leaf_grads}
    results = []
    for grads, scanned in ((leaf_grads, {}), (tree_grads, others_scanned)):
        tx = SCALE_BY[rule](
            dtype=jnp.float32,
            noise_scale=0.0,
            scanned_layers={**scanned, target: flag},
            **config,
        )
        updates, _ = _scan_steps(tx, grads)
        results.append(updates[target])
    alone, together = results
    scale = float(jnp.max(jnp.abs(alone), initial=0.0))
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4 * scale)


def _padding(factor, valid, diagonal: bool) -> np.ndarray:
    """The entries of a stacked factor that lie outside each entry's valid part."""
    factor, valid = np.asarray(factor), np.asarray(valid)
    index = np.arange(factor.shape[1])
    outside = index[None, :] >= valid[:, None]
    if not diagonal:
        outside = outside[:, :, None] | outside[:, None, :]
    return factor[outside]


def _all_padding(state: wk.WhiteKronState) -> np.ndarray:
    """Every padded factor entry, and the Lipschitz estimates of pipeline dummies."""
    pieces = [np.zeros(0)]
    for bucket in state.dense:
        pieces.append(_padding(bucket.Ql, bucket.valid_rows, diagonal=False))
        pieces.append(_padding(bucket.Qr, bucket.valid_cols, diagonal=False))
        pieces.append(np.asarray(bucket.Ll[bucket.valid_count :]))
        pieces.append(np.asarray(bucket.Lr[bucket.valid_count :]))
    for leaf in state.leaf_states():
        if leaf.kind == wk.LARGE_PATH:
            pieces.append(_padding(leaf.Ql, leaf.valid_rows, leaf.diag_left))
            pieces.append(_padding(leaf.Qr, leaf.valid_cols, leaf.diag_right))
            dummies = np.asarray(leaf.valid_rows) == 0
            pieces += [np.asarray(leaf.Ll)[dummies], np.asarray(leaf.Lr)[dummies]]
    return np.concatenate([p.ravel() for p in pieces])


@st.composite
def _trees(draw: st.DrawFn):
    config = draw(_configs())
    return config, draw(wkt.param_trees(config["block_size"]))


@_JITTED_PROPERTY
@hypothesis.given(
    case=_trees(),
    pipeline_axis_size=wkt.pipeline_sizes(4).filter(lambda k: k > 1),
    noise_scale=st.sampled_from([0.0, 1e-3]),
    init_scale=st.sampled_from([1.0, None]),
)
@hypothesis.example(  # every kind, edge tiles and strips, a scanned stack, 3 dummies
    case=(
        {"rule": "quad", "block_size": 8, "max_size_dense": 20},
        (
            _zeros({"w0": (2, 30, 5), "w1": (9, 17), "w2": (13,), "w3": (25, 30)}),
            {"w0": True, "w1": False, "w2": False, "w3": False},
        ),
    ),
    pipeline_axis_size=4,
    noise_scale=0.0,
    init_scale=None,
)
def test_padding_stays_zero_and_dummies_change_nothing(
    case, pipeline_axis_size, noise_scale, init_scale
):
    """Padding stays exactly zero and pipeline dummies change nothing, with the factors
    from a given scale or from each layer's first input (`preconditioner_init_scale`)."""
    config, (params, scanned) = case
    config = dict(config)
    rule = config.pop("rule")
    grads = _gradients(params, steps=20)
    results = []
    for k in (1, pipeline_axis_size):
        tx = SCALE_BY[rule](
            dtype=jnp.float32,
            noise_scale=noise_scale,
            pipeline_axis_size=k,
            scanned_layers=scanned,
            preconditioner_init_scale=init_scale,
            **config,
        )
        updates, state = _scan_steps(tx, grads)
        padding = _all_padding(state)
        assert np.all(padding == 0), f"{np.count_nonzero(padding)} padded entries moved"
        assert int(state.count) == 20 and int(state.skipped_steps) == 0
        results.append(updates)
    # Dummies draw no noise, so they change nothing even with noise on.
    for key, without in results[0].items():
        scale = float(jnp.max(jnp.abs(without), initial=0.0))
        np.testing.assert_allclose(results[1][key], without, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------
# (e) structure, shapes and dtypes are preserved: lax.scan works


def _mixed_params():
    return {
        "conv": jnp.ones((3, 3, 2, 4)),
        "stack": jnp.ones((2, 12, 6)),
        "big": jnp.ones((40, 6)),
        "bias": jnp.ones((6,)),
        "scale": jnp.ones(()),
    }


_MIXED_SCANNED = {"conv": False, "stack": True, "big": False, "bias": False, "scale": False}


@pytest.mark.parametrize("rule", ["quad", "skew"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_update_preserves_state_structure(rule, dtype):
    tx = OPTIMIZERS[rule](
        dtype=dtype, block_size=8, max_size_dense=16, scanned_layers=_MIXED_SCANNED
    )
    params = _mixed_params()
    state = tx.init(params)
    before = jax.eval_shape(lambda: state)
    updates, after = jax.eval_shape(tx.update, params, state, params)
    # Same tree (static fields included) and the same shape, dtype and weak type per leaf:
    # what `jit` keys its cache on, and what `lax.scan` requires of a carry.
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert jax.tree.leaves(before) == jax.tree.leaves(after)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype


def test_scan_matches_python_loop():
    tx = wk.skew(
        learning_rate=0.1,
        dtype=jnp.float32,
        block_size=8,
        max_size_dense=16,
        scanned_layers=_MIXED_SCANNED,
    )
    params = _mixed_params()
    rng = np.random.default_rng(0)
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal((10,) + p.shape), jnp.float32), params
    )

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        return (optax.apply_updates(params, updates), state), updates

    (scan_params, scan_state), scan_updates = jax.jit(lambda c, g: jax.lax.scan(step, c, g))(
        (params, tx.init(params)), grads
    )

    jit_step = jax.jit(step)
    carry, loop_updates = (params, tx.init(params)), []
    for i in range(10):
        carry, u = jit_step(carry, jax.tree.map(lambda g: g[i], grads))
        loop_updates.append(u)
    loop_updates = jax.tree.map(lambda *u: jnp.stack(u), *loop_updates)

    assert int(scan_state[0].count) == 10
    for a, b in zip(
        jax.tree.leaves((scan_params, scan_state, scan_updates)),
        jax.tree.leaves((*carry, loop_updates)),
        strict=True,
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    # The scan and the loop are two compiled programs, free to round differently (they
    # agree to ~1e-6 here; over a long training run the factor dynamics amplify such
    # differences: `python -m benchmarks drift`). The same program run again is bit-identical.
    carry_again, again = (params, tx.init(params)), []
    for i in range(10):
        carry_again, u = jit_step(carry_again, jax.tree.map(lambda g: g[i], grads))
        again.append(u)
    again = jax.tree.map(lambda *u: jnp.stack(u), *again)
    for a, b in zip(
        jax.tree.leaves((*carry_again, again)), jax.tree.leaves((*carry, loop_updates)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# (f) scanned_layers as a prefix tree


def _layered_params():
    return {
        "layers": {"w": jnp.ones((3, 8, 6)), "b": jnp.ones((3, 6))},
        "head": {"w": jnp.ones((6, 2)), "b": jnp.ones((2,))},
        "scale": jnp.ones(()),
    }


def test_scanned_layers_prefix_tree_equals_full_tree():
    params = _layered_params()
    prefix = {"layers": True, "head": False, "scale": False}
    full = {
        "layers": {"w": True, "b": True},
        "head": {"w": False, "b": False},
        "scale": False,
    }
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    results = []
    for scanned_layers in (prefix, full):
        tx = wk.scale_by_quad(scanned_layers=scanned_layers, dtype=jnp.float32, block_size=8)
        state = tx.init(params)
        results.append((state, *jax.jit(tx.update)(grads, state)))
    _assert_trees_equal(results[0], results[1])
    leaves = results[0][0].leaf_tree()
    assert leaves["layers"]["w"].scanned and leaves["layers"]["w"].B == 3
    assert leaves["layers"]["b"].scanned and leaves["head"]["w"].scanned == 0


@pytest.mark.parametrize(
    "scanned_layers, path",
    [
        ({"layers": True}, r"head"),  # missing keys: not a prefix
        ({"layers": [True], "head": False, "scale": False}, r"\['layers'\]"),
        ({"layers": {"w": True}, "head": False, "scale": False}, r"\['layers'\]"),
        ({"layers": True, "head": False, "scale": True}, r"\['scale'\]"),
    ],
)
def test_scanned_layers_that_do_not_fit_raise(scanned_layers, path):
    with pytest.raises(ValueError, match=path) as info:
        wk.scale_by_quad(scanned_layers=scanned_layers).init(_layered_params())
    assert "scanned_layers" in str(info.value)


# ---------------------------------------------------------------------------------------
# (h) compute groups: merging buckets into padded, possibly transposed, batched
# computations is the same maths as one computation per bucket


_GROUPED = {"a": (30, 5), "b": (5, 30), "c": (16, 16), "d": (3, 40), "e": (2, 12, 6)}
_GROUPED_SCANNED = {"a": False, "b": False, "c": False, "d": False, "e": True}


@pytest.mark.parametrize("rule", ["quad", "skew"])
def test_compute_groups_change_nothing(rule):
    """No merging, the CPU's merging and the accelerators' (generous merges) give the
    same updates and factors. Noise is off: it is numbered per compute group, so it
    legitimately differs between groupings."""
    from wkron_eqx import _layout

    params = _zeros({**_GROUPED, "v": (7,), "w": (3, 5, 1)})
    scanned = {**_GROUPED_SCANNED, "v": False, "w": True}
    grads = _gradients(params, steps=12)

    def run(grouping):
        config = wk.Config(
            dtype=jnp.float32,
            block_size=16,
            max_size_dense=64,
            noise_scale=0.0,
            scanned_layers=scanned,
        )
        backend = dataclasses.replace(wk.Backend.of(), grouping=grouping)
        rules = {"quad": wk.Quad(), "skew": wk.Procrustes()}
        tx = wk.scale_by_white_kron(rules[rule], config, backend=backend)
        updates, state = _scan_steps(tx, grads)
        return updates, state, state.plan.tree

    separate = _layout.Grouping(budget=-1.0)
    runs = [run(g) for g in (separate, _layout.CPU_GROUPING, _layout.ACCELERATOR_GROUPING)]
    (single_updates, single_state, single), (_, _, cpu), (_, _, accelerator) = runs
    # The cases really merge buckets, one of them transposed.
    assert len(single.groups) == len(single.buckets)
    assert len(accelerator.groups) <= len(cpu.groups) < len(cpu.buckets)
    assert any(m.transposed for g in cpu.groups for m in g.members)
    for updates, state, _ in runs[1:]:
        for key, expected in single_updates.items():
            scale = float(jnp.max(jnp.abs(expected)))
            np.testing.assert_allclose(updates[key], expected, rtol=1e-5, atol=1e-5 * scale)
        for a, b in zip(state.dense, single_state.dense, strict=True):
            for x, y in ((a.Ql, b.Ql), (a.Qr, b.Qr), (a.Ll, b.Ll), (a.Lr, b.Lr)):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        for a, b in zip(state.leaf_states(), single_state.leaf_states(), strict=True):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quad_factors_stay_symmetric_bit_for_bit(dtype):
    """QUAD computes `Q^T Q` as `Q Q`; that is exact only because every dense factor it
    produces equals its transpose bit for bit (balancing steps included)."""
    params = _zeros({"a": (30, 5), "b": (5, 30), "c": (16, 16), "big": (200, 12)})
    grads = _gradients(params, steps=101)  # step 100 balances
    tx = wk.scale_by_quad(dtype=dtype, block_size=16, max_size_dense=64, noise_scale=1e-3)
    _, state = _scan_steps(tx, grads)
    factors = [q for b in state.dense for q in (b.Ql, b.Qr)]
    for leaf in state.leaf_states():
        if leaf.kind == wk.LARGE_PATH:
            factors += [q for q in (leaf.Ql, leaf.Qr) if q is not None and q.ndim == 3]
    assert len(factors) >= 5
    for q in factors:
        q = np.asarray(q.astype(jnp.float32))
        assert not np.allclose(q, np.eye(q.shape[-1]))  # the factors really moved
        np.testing.assert_array_equal(q, np.swapaxes(q, -1, -2))
