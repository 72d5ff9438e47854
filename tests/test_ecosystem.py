"""The transforms inside the optax / equinox / optimistix ecosystem: hyperparameter
injection, wrappers (chain, MultiSteps, apply_if_finite, partition, masked,
schedule-free), optimistix, `eqx.filter_jit` on Modules, checkpoints, and
`preconditioner_stats` finding the state inside the wrappers (its values: test_stats.py)."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import optimistix as optx
import pytest

import wkron_eqx as wk


F32 = jnp.float32


def _tree_equal(a, b) -> bool:
    """Same structure, dtypes, shapes and bits."""
    leaves_a, treedef_a = jax.tree.flatten(a)
    leaves_b, treedef_b = jax.tree.flatten(b)
    if treedef_a != treedef_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


# ---------------------------------------------------------------------------------------
# A small regression problem shared by the wrapper tests: a linear map with a bias.


def _regression():
    key_x, key_w, key_noise = jr.split(jr.key(0), 3)
    x = jr.normal(key_x, (128, 6))
    w_true = 0.3 * jr.normal(key_w, (6, 4))
    y = x @ w_true + 0.01 * jr.normal(key_noise, (128, 4))
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
    return params, x, y


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)


def _train(tx: optax.GradientTransformation, steps: int, params=None):
    """`steps` jitted steps of `tx` on the regression; the params, state and loss before
    every step and after the last."""
    params_init, x, y = _regression()
    params = params_init if params is None else params

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    losses.append(float(_loss(params, x, y)))
    return params, state, losses


def _skew(learning_rate=0.1, **kwargs):
    return wk.skew(learning_rate, weight_decay=0.0, dtype=F32, **kwargs)


# ---------------------------------------------------------------------------------------
# optax.inject_hyperparams


def _static_args(factory, injected: tuple[str, ...]) -> tuple[str, ...]:
    """Every argument of `factory` except `injected`. `inject_hyperparams` turns every
    numeric argument into a (traced) array, but `block_size`, `b1`, ... decide shapes and
    branches at trace time, so they must stay Python values."""
    return tuple(n for n in inspect.signature(factory).parameters if n not in injected)


def test_inject_hyperparams_learning_rate_without_recompiling():
    params, x, y = _regression()
    tx = optax.inject_hyperparams(wk.skew, static_args=_static_args(wk.skew, ("learning_rate",)))(
        learning_rate=0.1, weight_decay=1e-3, dtype=F32
    )
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return updates, state

    state = tx.init(params)
    assert state.hyperparams["learning_rate"].dtype == F32
    full, _ = step(params, state)
    state_half = state._replace(
        hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(0.05, F32)}
    )
    half, _ = step(params, state_half)
    # Halving is exact in binary floating point, so the update halves bit for bit.
    assert _tree_equal(half, jax.tree.map(lambda u: u / 2, full))
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(full))
    # A training run whose learning rate is changed by hand every step: one trace in all.
    start = float(_loss(params, x, y))
    for lr in np.geomspace(0.2, 0.02, 60):
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": F32(lr)})
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert len(traces) == 1
    assert float(_loss(params, x, y)) < 0.1 * start


def test_inject_hyperparams_learning_rate_and_weight_decay():
    params, x, y = _regression()
    params = jax.tree.map(lambda p: p + 1.0, params)
    injected = ("learning_rate", "weight_decay")
    tx = optax.inject_hyperparams(wk.skew, static_args=_static_args(wk.skew, injected))(
        learning_rate=0.1, weight_decay=0.0, dtype=F32
    )
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(jax.grad(_loss)(params, x, y), state, params)
        return updates, state

    state = tx.init(params)
    plain, _ = step(params, state)
    hyper = {**state.hyperparams, "weight_decay": jnp.asarray(0.5, F32)}
    decayed, _ = step(params, state._replace(hyperparams=hyper))
    # decoupled weight decay adds -lr * wd * params to the update
    for u0, u1, p in zip(*map(jax.tree.leaves, (plain, decayed, params)), strict=True):
        np.testing.assert_allclose(u1 - u0, -0.1 * 0.5 * p, rtol=1e-5, atol=1e-7)
    assert len(traces) == 1


@pytest.mark.parametrize("factory", [wk.quad, wk.skew])
@pytest.mark.parametrize("mask", [None, {"w": True, "b": False}])
def test_the_state_has_one_structure_whatever_the_weight_decay(factory, mask):
    """A plain `weight_decay=0`, another decay and an injected `0.0` give states of one
    structure (as `optax.adamw`'s): a checkpoint saved with one restores into the other.
    A plain `0` still needs no `params`, and changes nothing."""
    params = {"w": jnp.ones((4, 3), F32), "b": jnp.ones((3,), F32)}
    kwargs = dict(learning_rate=0.1, weight_decay_mask=mask, dtype=F32)
    without = factory(weight_decay=0, **kwargs)
    with_decay = factory(weight_decay=0.1, **kwargs)
    injected = optax.inject_hyperparams(factory, static_args=wk.STATIC_ARGS)(
        weight_decay=0.0, **kwargs
    )
    structure = jax.tree.structure(without.init(params))
    assert jax.tree.structure(with_decay.init(params)) == structure
    assert jax.tree.structure(injected.init(params).inner_state) == structure
    # Decay 0 without params, and the decayed run's state restored into it: the same
    # updates as the decayed run's at decay 0 (through the injected one).
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    restored = jax.tree.unflatten(structure, jax.tree.leaves(with_decay.init(params)))
    updates, _ = jax.jit(without.update)(grads, restored)
    reference, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    assert _tree_equal(updates, reference)


# ---------------------------------------------------------------------------------------
# optax wrappers


@pytest.mark.parametrize("scale_by", [wk.scale_by_quad, wk.scale_by_skew])
def test_chain(scale_by):
    tx = optax.chain(
        optax.clip_by_global_norm(10.0),
        scale_by(dtype=F32),
        optax.add_decayed_weights(1e-4),
        optax.scale(-0.1),
    )
    _, state, losses = _train(tx, 60)
    assert losses[-1] < 0.1 * losses[0]
    assert int(state[1].count) == 60


def test_multisteps_accumulates_every_second_step():
    tx = optax.MultiSteps(_skew(), every_k_schedule=2)
    params, x, y = _regression()
    start = float(_loss(params, x, y))
    # optax's MultiSteps divides a float32 sum by an int32 count: not allowed under the
    # strict promotion of this suite, so this test uses the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x, y), s, p))
        for i in range(1, 121):
            updates, state = step(params, state)
            new_params = optax.apply_updates(params, updates)
            assert (not _tree_equal(new_params, params)) == (i % 2 == 0), i
            params = new_params
    # the inner optimizer took one step per two gradients
    assert int(state.inner_opt_state[0].count) == 60
    assert float(_loss(params, x, y)) < 0.1 * start


def test_apply_if_finite_skips_a_nan_gradient():
    tx = optax.apply_if_finite(_skew(), max_consecutive_errors=3)
    params, x, y = _regression()

    @jax.jit
    def step(params, state, scale):
        grads = jax.tree.map(lambda g: scale * g, jax.grad(_loss)(params, x, y))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = float(_loss(params, x, y))
    params, state = step(params, state, F32(1))
    new_params, new_state = step(params, state, F32(jnp.nan))
    assert _tree_equal(new_params, params)
    assert _tree_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
    params, state = new_params, new_state
    for _ in range(60):
        params, state = step(params, state, F32(1))
    assert int(state.notfinite_count) == 0 and int(state.inner_state[0].count) == 61
    assert float(_loss(params, x, y)) < 0.1 * start


def _matrix_labels(params):
    return jax.tree.map(lambda p: "skew" if p.ndim == 2 else "adamw", params)


def test_partition_and_masked_match_the_parts():
    """`optax.partition` (skew on matrices, adamw elsewhere) and the same built from two
    `optax.masked` give, leaf for leaf, the updates of each optimizer run alone."""
    params, x, y = _regression()
    adamw = lambda: optax.adamw(3e-2, weight_decay=1e-4)
    partition = optax.partition({"skew": _skew(), "adamw": adamw()}, _matrix_labels)
    is_matrix = lambda p: jax.tree.map(lambda leaf: leaf.ndim == 2, p)
    not_matrix = lambda p: jax.tree.map(lambda leaf: leaf.ndim != 2, p)
    masked = optax.chain(optax.masked(_skew(), is_matrix), optax.masked(adamw(), not_matrix))
    skew_alone, adamw_alone = _skew(), adamw()

    @jax.jit
    def step(params, states):
        grads = jax.grad(_loss)(params, x, y)
        u_part, s_part = partition.update(grads, states[0], params)
        u_mask, s_mask = masked.update(grads, states[1], params)
        u_skew, s_skew = skew_alone.update({"w": grads["w"]}, states[2], {"w": params["w"]})
        u_adam, s_adam = adamw_alone.update({"b": grads["b"]}, states[3], {"b": params["b"]})
        return (u_part, u_mask, {**u_skew, **u_adam}), (s_part, s_mask, s_skew, s_adam)

    start = float(_loss(params, x, y))
    # optax's adamw raises a Python float to an int32 power: standard promotion needed.
    with jax.numpy_dtype_promotion("standard"):
        states = (
            partition.init(params),
            masked.init(params),
            skew_alone.init({"w": params["w"]}),
            adamw_alone.init({"b": params["b"]}),
        )
        for _ in range(60):
            (u_part, u_mask, u_alone), states = step(params, states)
            assert _tree_equal(u_part, u_alone)
            assert _tree_equal(u_mask, u_part)
            params = optax.apply_updates(params, u_part)
    assert float(_loss(params, x, y)) < 0.1 * start


def test_schedule_free():
    lr = 0.1
    tx = optax.contrib.schedule_free(_skew(lr, b1=0.0), learning_rate=lr, b1=0.9)
    params, state, losses = _train(tx, 60)
    _, x, y = _regression()
    eval_params = optax.contrib.schedule_free_eval_params(state, params)
    assert float(_loss(eval_params, x, y)) < 0.01 * losses[0]
    assert int(state.base_optimizer_state[0].count) == 60


# ---------------------------------------------------------------------------------------
# equinox Modules and optimistix


def _mlp_problem():
    key_model, key_teacher, key_x = jr.split(jr.key(1), 3)
    model = eqx.nn.MLP(3, 2, width_size=16, depth=1, activation=jnp.tanh, key=key_model)
    teacher = eqx.nn.MLP(3, 2, width_size=8, depth=1, activation=jnp.tanh, key=key_teacher)
    x = jr.normal(key_x, (128, 3))
    return model, x, jax.vmap(teacher)(x)


def _mlp_loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def test_filter_jit_on_module_with_non_array_leaves():
    model, x, y = _mlp_problem()
    # The MLP holds activation functions: the optimizer sees `None` there.
    assert any(callable(leaf) for leaf in jax.tree.leaves(model))
    tx = wk.skew(learning_rate=3e-2, weight_decay=1e-4, dtype=F32)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(_mlp_loss)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    start = float(_mlp_loss(model, x, y))
    for _ in range(60):
        model, opt_state, _ = step(model, opt_state)
    assert float(_mlp_loss(model, x, y)) < 0.1 * start


def test_optimistix_optax_minimiser_on_module():
    model, x, y = _mlp_problem()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params, args):
        return _mlp_loss(eqx.combine(params, static), *args)

    solver = optx.OptaxMinimiser(wk.quad(3e-2, weight_decay=0.0, dtype=F32), rtol=0.0, atol=0.0)
    solution = optx.minimise(fn, solver, params, args=(x, y), max_steps=60, throw=False)
    assert solution.stats["num_steps"] == 60
    assert float(fn(solution.value, (x, y))) < 0.1 * float(fn(params, (x, y)))


# ---------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    # bfloat16 (the default) state, a scanned stack, a large and a 1-D leaf.
    params, x, y = _regression()
    params = {**params, "stack": jnp.zeros((2, 4, 4)), "big": jnp.zeros((20, 3))}

    def loss(p):
        return _loss(p, x, y) + jnp.sum((p["stack"] - 1) ** 2) + jnp.sum((p["big"] - 2) ** 2)

    def make():
        return wk.skew(1e-2, scanned_layers={"w": False, "b": False, "stack": True, "big": False},
                       max_size_dense=16, block_size=8)  # fmt: skip

    tx = make()

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    path = tmp_path / "checkpoint.eqx"
    eqx.tree_serialise_leaves(path, (params, state))
    fresh = jax.tree.map(jnp.zeros_like, params)
    loaded_params, loaded_state = eqx.tree_deserialise_leaves(path, (fresh, make().init(fresh)))
    assert _tree_equal((loaded_params, loaded_state), (params, state))
    for _ in range(3):
        params, state = step(params, state)
        loaded_params, loaded_state = step(loaded_params, loaded_state)
    assert _tree_equal((loaded_params, loaded_state), (params, state))
    assert int(state[0].count) == 6


# ---------------------------------------------------------------------------------------
# preconditioner_stats finds the state inside every wrapper (its values: test_stats.py)


def _wrapped_skews():
    static = _static_args(wk.skew, ("learning_rate",))
    is_matrix = lambda p: jax.tree.map(lambda leaf: leaf.ndim == 2, p)
    partition = lambda: optax.partition(
        {"skew": wk.skew(), "adamw": optax.adam(1e-3)},
        lambda p: jax.tree.map(lambda leaf: "skew" if leaf.ndim == 2 else "adamw", p),
    )
    return [
        pytest.param(lambda: optax.inject_hyperparams(wk.skew, static)(0.1), id="inject"),
        pytest.param(lambda: optax.MultiSteps(wk.skew(), 2), id="multisteps"),
        pytest.param(lambda: optax.apply_if_finite(wk.skew(), 3), id="apply_if_finite"),
        pytest.param(lambda: optax.contrib.schedule_free(wk.skew(b1=0.0), 0.1), id="sfree"),
        pytest.param(lambda: optax.masked(wk.skew(), is_matrix), id="masked"),
        pytest.param(partition, id="partition"),
    ]


@pytest.mark.parametrize("make", _wrapped_skews())
def test_preconditioner_stats_finds_the_state_inside_wrappers(make):
    params = {"w": jnp.zeros((27, 32)), "b": jnp.zeros((5,))}
    stats = wk.preconditioner_stats(make().init(params))
    assert int(stats["w"]["kind"]) == wk.DENSE_PATH and int(stats["w"]["tiles"]) == 1
    np.testing.assert_allclose(stats["w"]["padding_fraction"], 1 - 27 * 32 / (32 * 32))
    np.testing.assert_array_equal(stats["w"]["rms_left"], [1.0])  # the identity
