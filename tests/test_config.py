"""Bad configurations fail at construction with a `ValueError` naming the argument, and the
factories' signatures are the reference contract (SPEC section 1)."""

import inspect
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import wkron_eqx as wk


FACTORIES = {
    "scale_by_quad": wk.scale_by_quad,
    "scale_by_skew": wk.scale_by_skew,
    "quad": wk.quad,
    "skew": wk.skew,
}

BAD = [
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
    (n, v) for n, v in BAD_TYPES if n not in ("lr_style", "dtype", "pipeline_axis_name")
]


@pytest.mark.parametrize("name, value", _CONFIG_BAD, ids=[_id(c) for c in _CONFIG_BAD])
def test_config_refuses_bad_numbers_with_value_error(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        wk.Config(**{name: value})


def test_config_message_is_a_sentence():
    with pytest.raises(ValueError) as info:
        wk.Config(block_size=0)
    assert str(info.value) == "`block_size` must be an int >= 1, got 0."


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(b1=0),
        dict(noise_scale=0),
        dict(preconditioner_lr=1),
        dict(preconditioner_init_scale=2),
        dict(preconditioner_update_probability=1),
        dict(weight_decay=0),
        dict(learning_rate=1),
    ],
    ids=lambda kwargs: ",".join(f"{k}={v!r}" for k, v in kwargs.items()),
)
def test_int_values_of_float_arguments_are_accepted(kwargs):
    wk.quad(**kwargs)


@pytest.mark.parametrize("factory", ["quad", "skew"])
@pytest.mark.parametrize("value", [-0.1, -1.0, math.nan, math.inf])
def test_bad_weight_decay_raises(factory, value):
    with pytest.raises(ValueError, match="`weight_decay`"):
        FACTORIES[factory](weight_decay=value)


@pytest.mark.parametrize("factory", FACTORIES)
def test_good_edge_values_are_accepted(factory):
    # the boundaries of the allowed ranges, and every allowed dtype spelling
    for kwargs in [
        dict(b1=0.0),
        dict(b1=0.999),
        dict(lr_style=None),
        dict(block_size=1, max_size_dense=1, pipeline_axis_size=8),
        dict(noise_scale=0.0),
        dict(preconditioner_update_probability=1.0),
        dict(preconditioner_update_probability=lambda step: 0.5),
        dict(dtype=jnp.float32),
        dict(dtype="bfloat16"),
    ]:
        FACTORIES[factory](**kwargs)


# ---------------------------------------------------------------------------------------
# signatures: the reference's names, order and defaults (seed/white_kron_api_reference.txt)

_SCALE_BY_REFERENCE = [
    ("lr_style", "adam"),
    ("b1", 0.95),
    ("normalize_grads", False),
    ("max_size_dense", 16384),
    ("preconditioner_lr", 0.7),
    ("preconditioner_init_scale", 1.0),
    ("dtype", jnp.bfloat16),
    ("scanned_layers", None),
    ("block_size", 256),
    ("pipeline_axis_name", None),
    ("pipeline_axis_size", 1),
    ("params_partition_specs", None),
    ("noise_scale", 1e-9),
]
_OPTIMIZER_REFERENCE = [
    ("learning_rate", 0.001),
    ("lr_style", "adam"),
    ("b1", 0.95),
    ("weight_decay", 0.1),
    ("weight_decay_mask", None),
    *_SCALE_BY_REFERENCE[2:],
]
_ADDED = {"preconditioner_update_probability": 1.0, "matmul_dtype": None}


@pytest.mark.parametrize("factory", FACTORIES)
def test_signature_matches_reference(factory):
    reference = _OPTIMIZER_REFERENCE if factory in ("quad", "skew") else _SCALE_BY_REFERENCE
    parameters = list(inspect.signature(FACTORIES[factory]).parameters.values())
    # the reference's parameters first, in its order, with its defaults
    head = [(p.name, p.default) for p in parameters[: len(reference)]]
    assert [name for name, _ in head] == [name for name, _ in reference]
    for (name, default), (_, expected) in zip(head, reference, strict=True):
        if name == "dtype":
            assert default is jnp.bfloat16
        else:
            assert default == expected and type(default) is type(expected), name
    # added parameters come after, with defaults that keep the reference behaviour
    added = {p.name: p.default for p in parameters[len(reference) :]}
    assert added == _ADDED
    for p in parameters:
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


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
