"""Bad configurations fail at construction with a `ValueError` naming the argument, good
ones at the edges of the allowed ranges are honoured, and numbers of any spelling (int,
NumPy scalar) act as their Python values. (The factories' signatures, the reference's
names, order and defaults, are checked in `test_factories.py`.)"""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import wkron_eqx as wk

from .helpers import assert_trees_close, assert_trees_equal


FACTORIES = {
    "scale_by_quad": wk.scale_by_quad,
    "scale_by_skew": wk.scale_by_skew,
    "quad": wk.quad,
    "skew": wk.skew,
}

BAD = [
    ("pipeline_axis_name", ("data", "data")),
    ("pipeline_axis_name", ()),
    ("block_size", 0),
    ("block_size", -1),
    ("block_size", True),  # a bool is an int to a type checker, not to `Config`
    ("b1", -0.1),
    ("b1", 1.0),
    ("b1", 1.5),
    ("b1", math.nan),
    ("lr_style", "sgd"),
    ("max_size_dense", 0),
    ("max_size_dense", -1),
    ("preconditioner_lr", 0.0),
    ("preconditioner_lr", -1.0),
    ("preconditioner_lr", 0),
    ("preconditioner_lr", -1),
    ("preconditioner_init_scale", 0.0),
    ("preconditioner_init_scale", 0),
    ("dtype", jnp.float16),
    ("dtype", jnp.int32),
    ("dtype", "float64"),
    ("pipeline_axis_size", 0),
    ("noise_scale", -1.0),
    ("noise_scale", -1),
    ("preconditioner_update_probability", 0.0),
    ("preconditioner_update_probability", 0),
    ("preconditioner_update_probability", 1.5),
    ("matmul_dtype", jnp.float16),
    ("matmul_dtype", "int8"),
    ("memory_save_mode", "one-diag"),
    ("memory_save_mode", "diag"),
]


def _id(case):
    name, value = case.values if hasattr(case, "values") else case
    return f"{name}={value!r}"


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("name, value", BAD, ids=[_id(c) for c in BAD])
def test_bad_configuration_raises_naming_the_argument(factory, name, value):
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        FACTORIES[factory](**{name: value})
    message = str(info.value)
    assert repr(value) in message or str(value) in message, message
    if name == "dtype":
        assert "float32" in message and "bfloat16" in message, message


# Values of the wrong type. Without a runtime type checker they get the same `ValueError`
# (`Config` checks values whatever their type); under one (the suite runs with jaxtyping +
# beartype) the factories' annotations refuse them first, naming the parameter.
BAD_TYPES = [
    ("block_size", 2.5),
    ("max_size_dense", "16"),
    ("b1", "0.9"),
    ("normalize_grads", 1),
    ("stochastic_rounding", 1),
    ("cache_preconditioner", "yes"),
    ("memory_save_mode", 1),
    ("lr_style", 1),
    ("dtype", 3),
    ("pipeline_axis_name", 0),
]


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("name, value", BAD_TYPES, ids=[_id(c) for c in BAD_TYPES])
def test_bad_type_raises_naming_the_argument(factory, name, value):
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)) as info:
        FACTORIES[factory](**{name: value})
    message = str(info.value)
    if info.type is ValueError:
        assert f"`{name}`" in message and repr(value) in message, message
    else:
        assert f"parameter '{name}'" in message, message


# `Config`'s number fields take any type (they go through `python_scalar` first), so it
# answers a wrong type there with its own `ValueError`, type checker or not.
_CONFIG_BAD = BAD + [
    (n, v)
    for n, v in BAD_TYPES
    if n not in ("lr_style", "dtype", "pipeline_axis_name", "memory_save_mode")
]


@pytest.mark.parametrize("name, value", _CONFIG_BAD, ids=[_id(c) for c in _CONFIG_BAD])
def test_config_refuses_bad_numbers_with_value_error(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        wk.Config(**{name: value})


def test_config_message_is_a_sentence():
    with pytest.raises(ValueError) as info:
        wk.Config(block_size=0)
    assert str(info.value) == "`block_size` must be an int >= 1, got 0."


_PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}


def _step_jaxpr(**kwargs) -> str:
    """The traced `init` + `update` of `quad`: equal strings are the same computation
    (every constant is printed)."""
    tx = wk.quad(**kwargs)
    return str(jax.make_jaxpr(lambda p: tx.update(p, tx.init(p), p))(_PARAMS))


@pytest.mark.parametrize(
    "name, value, other",
    [
        ("b1", 0, 0.5),
        ("noise_scale", 0, 0.5),
        ("preconditioner_lr", 1, 1.5),
        ("preconditioner_init_scale", 2, 2.5),
        ("preconditioner_update_probability", 1, 0.5),
        ("weight_decay", 0, 0.5),
        ("learning_rate", 1, 1.5),
    ],
)
def test_int_values_of_float_arguments_act_as_the_floats(name, value, other):
    # An int gives the very computation its float gives; and the comparison sees the
    # value (another value gives another computation).
    as_int = _step_jaxpr(**{name: value})
    assert as_int == _step_jaxpr(**{name: float(value)})
    assert as_int != _step_jaxpr(**{name: other})


@pytest.mark.parametrize("factory", ["quad", "skew"])
@pytest.mark.parametrize("value", [-0.1, -1.0, math.nan, math.inf])
def test_bad_weight_decay_raises(factory, value):
    with pytest.raises(ValueError, match="`weight_decay`"):
        FACTORIES[factory](weight_decay=value)


# The boundaries of the allowed ranges, and every allowed dtype spelling.
EDGES = {
    "b1=0": dict(b1=0.0),
    "b1=0.999": dict(b1=0.999),
    "lr_style=None": dict(lr_style=None),
    "sizes=1": dict(block_size=1, max_size_dense=1, pipeline_axis_size=8),
    "noise_scale=0": dict(noise_scale=0.0),
    "probability=1": dict(preconditioner_update_probability=1.0),
    "probability=schedule": dict(preconditioner_update_probability=lambda step: 0.5),
    "dtype=float32": dict(dtype=jnp.float32),
    "dtype='bfloat16'": dict(dtype="bfloat16"),
}
_GRADS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.5, -2.0, 1.0])}


def _steps(steps: int = 1, **kwargs):
    """`(updates of each step, state after each step)` of `scale_by_quad` on `_GRADS`."""
    return _cached_steps(steps, tuple(sorted(kwargs.items())))


@functools.cache
def _cached_steps(steps: int, items: tuple):
    tx = wk.scale_by_quad(**{"dtype": jnp.float32, **dict(items)})
    update, state = jax.jit(tx.update), tx.init(_PARAMS)
    updates, states = [], []
    for _ in range(steps):
        u, state = update(_GRADS, state)
        updates.append(jax.tree.map(np.asarray, u))
        states.append(state)
    return updates, states


def _jaxpr(**kwargs) -> str:
    tx = wk.scale_by_quad(**kwargs)
    return str(jax.make_jaxpr(tx.update)(_PARAMS, tx.init(_PARAMS)))


@pytest.mark.parametrize("edge", EDGES)
def test_good_edge_values_are_accepted_and_honoured(edge):
    kwargs = EDGES[edge]
    for factory in FACTORIES.values():
        factory(**kwargs)
    if edge == "b1=0":
        # no momentum: the raw gradient, as with b1 = 0.5 at step 1 (0.5 g / (1 - 0.5))
        (u,), (state,) = _steps(**kwargs)
        assert state.mu is None
        assert_trees_equal(u, _steps(b1=0.5)[0][0])
    elif edge == "b1=0.999":
        (u,), (state,) = _steps(**kwargs)
        assert state.mu is not None
        # bias-corrected, the input is g at step 1, up to float32 rounding of 1 - 0.999
        assert_trees_close(u, _steps(b1=0.0)[0][0], rtol=1e-4, atol=1e-5)
    elif edge == "lr_style=None":
        # the same update, not divided by 5
        undivided = jax.tree.map(lambda x: 5 * x, _steps()[0][0])
        assert_trees_close(_steps(**kwargs)[0][0], undivided, 1e-6)
    elif edge == "sizes=1":
        # every side is "large": both factors diagonal, stacks padded to a multiple of 8
        (u,), (state,) = _steps(**kwargs)
        assert state.dense == ()
        w = state.leaf_states()[1]
        assert (w.kind, w.diag_left, w.diag_right, w.stack) == (wk.LARGE_PATH, True, True, 8)
        assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree.leaves(u))
    elif edge == "noise_scale=0":
        # no noise is drawn at all (the draw is the only `erf_inv` of the step)
        assert "erf_inv" not in _jaxpr(**kwargs) and "erf_inv" in _jaxpr()
    elif edge == "probability=1":
        # every step updates the factors, without a `cond`
        assert "cond" not in _jaxpr(**kwargs)
        _, states = _steps(2, **kwargs)
        assert [int(s.factor_updates) for s in states] == [1, 2]
    elif edge == "probability=schedule":
        # the factors update every second step, behind one `cond`
        assert "cond" in _jaxpr(**kwargs)
        _, states = _steps(4, **kwargs)
        assert [int(s.factor_updates) for s in states] == [0, 1, 1, 2]
    else:
        # the factors and the momentum are stored in the given dtype; a string is a dtype
        expected = jnp.dtype(kwargs["dtype"])
        (u,), (state,) = _steps(**kwargs)
        assert state.dense[0].Ql.dtype == expected and state.mu["w"].dtype == expected
        if edge == "dtype='bfloat16'":
            (u_named,), (state_named,) = _steps(dtype=jnp.bfloat16)
            assert_trees_equal((u, state), (u_named, state_named))


def test_importing_the_package_does_not_import_hypothesis():
    # `hypothesis` is a test dependency: only `import wkron_eqx.testing` needs it.
    code = (
        "import sys, wkron_eqx; "
        "assert 'hypothesis' not in sys.modules; "
        "assert not hasattr(wkron_eqx, 'testing'); "
        "import wkron_eqx.testing; "
        "assert 'hypothesis' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_numpy_scalars_are_accepted_as_their_python_values():
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
    numpy_args = dict(
        block_size=np.int64(8),
        b1=np.float32(0.5),
        learning_rate=np.float32(1e-2),
        weight_decay=np.float32(0.1),
        normalize_grads=np.bool_(True),
        dtype=jnp.float32,
    )
    python_args = {k: v.item() if isinstance(v, np.generic) else v for k, v in numpy_args.items()}
    with jax.numpy_dtype_promotion("standard"):  # optax's decay mixes Python floats
        for make in (wk.quad, wk.skew):
            a, b = make(**numpy_args), make(**python_args)
            ua, _ = a.update(params, a.init(params), params)
            ub, _ = b.update(params, b.init(params), params)
            for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="`block_size`"):
        wk.quad(block_size=np.int64(0))
