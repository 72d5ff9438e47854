"""What `init` and `update` refuse, and how: the leaf is named and the fix is given."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk


def _mlp():
    return eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))


@pytest.mark.parametrize("factory", [wk.quad, wk.skew, wk.scale_by_quad])
def test_unfiltered_equinox_model_is_refused_at_init(factory):
    with pytest.raises(TypeError, match=r"\.activation.*not an array.*eqx\.filter"):
        factory().init(_mlp())


@pytest.mark.parametrize(
    "leaf, words",
    [
        (jnp.arange(3), "dtype int32"),
        (np.ones(3, bool), "dtype bool"),
        (jnp.ones(3, jnp.complex64), "dtype complex64"),
        (3, "int, not an array"),
        ("a", "str, not an array"),
    ],
)
def test_non_float_leaves_are_refused_at_init_naming_them(leaf, words):
    params = {"w": jnp.ones((3, 3)), "bad": leaf}
    with pytest.raises(TypeError, match=rf"\['bad'\].*{words}.*eqx\.is_inexact_array"):
        wk.quad().init(params)


def test_filtered_model_and_python_floats_are_accepted():
    params = eqx.filter(_mlp(), eqx.is_inexact_array)
    state = wk.quad(dtype=jnp.float32).init(params)
    assert len(state[0].leaf_states()) == len(jax.tree.leaves(params))
    wk.quad().init({"w": jnp.ones((2, 2)), "scale": 1.0})


def test_float0_gradient_is_refused_at_update():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    tx = wk.quad()
    state = tx.init(params)
    grads = {"w": jnp.ones((3, 3)), "b": np.zeros(3, jax.dtypes.float0)}
    with pytest.raises(TypeError, match=r"\['b'\].*float0.*filter_grad"):
        tx.update(grads, state, params)


@pytest.mark.parametrize("flag", [1, 0, jnp.asarray(True)])
def test_scanned_flag_that_is_not_a_bool_is_refused_naming_the_leaf(flag):
    params = {"layers": jnp.ones((3, 4, 4)), "head": jnp.ones((4, 2))}
    config = wk.Config(scanned_layers={"layers": flag, "head": False}, block_size=4)
    with pytest.raises(ValueError, match=r"`scanned_layers` at \['layers'\] must be a bool"):
        wk.scale_by_white_kron(wk.Quad(), config).init(params)


@pytest.mark.parametrize("flag", [True, np.True_])
def test_python_and_numpy_bools_are_accepted(flag):
    params = {"layers": jnp.ones((3, 4, 4)), "head": jnp.ones((4, 2))}
    config = wk.Config(scanned_layers={"layers": flag, "head": False}, block_size=4)
    state = wk.scale_by_white_kron(wk.Quad(), config).init(params)
    leaves = state.leaf_tree()
    assert leaves["layers"].scanned == 1 and leaves["layers"].B == 3
    assert leaves["head"].scanned == 0


def test_state_counts_factor_updates_across_refreshes():
    """`update_counter` resets at each refresh; `factor_updates` counts them all."""
    params = {"w": jnp.ones((4, 4))}
    tx = wk.scale_by_quad(dtype=jnp.float32, preconditioner_update_probability=0.25)
    state = tx.init(params)
    update = jax.jit(tx.update)
    counters, refreshes = [], []
    for _ in range(9):
        _, state = update(params, state, params)
        counters.append(int(state.update_counter))
        refreshes.append(int(state.factor_updates))
    # Every 4th step refreshes (deterministic counter scheme with p = 1/4).
    assert counters == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert refreshes == [0, 0, 0, 1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("factory", [wk.quad, wk.skew])
def test_missing_params_with_weight_decay_is_refused_before_any_work(factory, monkeypatch):
    params = {"w": jnp.ones((4, 3))}
    tx = factory(weight_decay=1e-2)
    state = tx.init(params)
    # Refused before the preconditioner runs: its update is never reached.
    from wkron_eqx import _transform

    def never(*args):
        raise AssertionError("the preconditioner ran")

    monkeypatch.setattr(_transform, "_precondition", never)
    with pytest.raises(ValueError, match=r"needs the current `params`.*weight_decay=0"):
        tx.update(params, state)
    # Without a weight decay, `params` is not needed.
    tx = factory(weight_decay=0.0)
    monkeypatch.undo()
    updates, _ = jax.jit(tx.update)(params, tx.init(params))
    assert updates["w"].shape == (4, 3)


def test_the_namespace_holds_the_public_names_only():
    # Modules are left out: `wkron_eqx.testing`, once imported, is an attribute, and the
    # suite's jaxtyping import hook adds `jaxtyping`.
    names = [n for n in dir(wk) if not n.startswith("_")]
    public = {n for n in names if not inspect.ismodule(getattr(wk, n))}
    assert public == set(wk.__all__)
