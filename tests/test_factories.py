"""The four factories and `Config`: one set of defaults (the reference's), docstrings a
static reader (mkdocstrings/griffe) finds in the source, `STATIC_ARGS` for
`optax.inject_hyperparams`, and the package's `__all__`."""

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wkron_eqx as wk

from .reference_signatures import ADDED, OPTIMIZER_REFERENCE, SCALE_BY_REFERENCE


F32 = jnp.float32
FACTORIES = {
    "scale_by_quad": wk.scale_by_quad,
    "scale_by_skew": wk.scale_by_skew,
    "quad": wk.quad,
    "skew": wk.skew,
}
INJECTABLE = ("learning_rate", "weight_decay")


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


# ---------------------------------------------------------------------------------------
# one set of defaults: the reference's (eformer 0.0.101's `white_kron`) names, order and
# defaults, then ours after them; in `Config` and in each of the four factories


def _parameters(name: str) -> list[tuple[str, object]]:
    """`(name, default)` of `Config`'s fields or of a factory's parameters, in order."""
    if name == "Config":
        return [(f.name, f.default) for f in dataclasses.fields(wk.Config)]
    return [(p.name, p.default) for p in inspect.signature(FACTORIES[name]).parameters.values()]


@pytest.mark.parametrize("name", ["Config", *FACTORIES])
def test_parameters_are_the_references_then_ours(name):
    reference = OPTIMIZER_REFERENCE if name in ("quad", "skew") else SCALE_BY_REFERENCE
    parameters = _parameters(name)
    head, tail = parameters[: len(reference)], parameters[len(reference) :]
    # the reference's parameters first, in its order, with its defaults (of its types)
    assert [n for n, _ in head] == [n for n, _ in reference]
    for (n, default), (_, expected) in zip(head, reference, strict=True):
        assert _same(default, expected), n
    # then ours, in one order everywhere (`Config`'s), with defaults that keep the
    # reference's behaviour
    ours = [n for n, _ in _parameters("Config")[len(SCALE_BY_REFERENCE) :]]
    assert sorted(ours) == sorted(ADDED)
    assert [n for n, _ in tail] == ours
    for n, default in tail:
        assert _same(default, ADDED[n]), n
    if name != "Config":
        for p in inspect.signature(FACTORIES[name]).parameters.values():
            assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), p.name


def _factory_defs() -> dict[str, ast.FunctionDef]:
    source = inspect.getsource(inspect.getmodule(inspect.unwrap(wk.quad)))
    return {
        node.name: node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name in FACTORIES
    }


@pytest.mark.parametrize("factory", FACTORIES)
def test_docstring_and_defaults_are_in_the_source(factory):
    # What a static reader sees: a `def` with a literal docstring (no `__doc__ =`, no
    # closure) documenting every parameter in order, and literal defaults.
    node = _factory_defs()[factory]
    doc = ast.get_docstring(node)
    assert doc is not None and doc == inspect.getdoc(FACTORIES[factory])
    assert "**Arguments:**" in doc and "**Returns:**" in doc
    arguments = doc.split("**Arguments:**")[1].split("**Returns:**")[0]
    # each entry `- `a`, `b`: ...` (continued on indented lines) documents the names
    # before its first ": "
    entries = [" ".join(e.split()) for e in re.split(r"^- ", arguments, flags=re.M)[1:]]
    documented = [n for e in entries for n in re.findall(r"`(\w+)`", e.split(": ")[0])]
    names = list(inspect.signature(FACTORIES[factory]).parameters)
    assert documented == names
    # the defaults a static reader shows are the ones that run (those are the reference's,
    # as `test_parameters_are_the_references_then_ours` checks)
    runtime = dict(_parameters(factory))
    for arg, default in zip(node.args.args[-len(node.args.defaults) :], node.args.defaults):
        if arg.arg == "dtype":
            assert ast.unparse(default) == "jnp.bfloat16"
        else:
            assert _same(ast.literal_eval(default), runtime[arg.arg]), arg.arg
    assert len(node.args.defaults) == len(names)


def test_config_turns_numpy_scalars_into_python_numbers():
    config = wk.Config(b1=np.float32(0.5), block_size=np.int64(8), normalize_grads=np.bool_(True))
    assert (type(config.b1), type(config.block_size), type(config.normalize_grads)) == (
        float,
        int,
        bool,
    )
    assert (config.b1, config.block_size, config.normalize_grads) == (0.5, 8, True)


# ---------------------------------------------------------------------------------------
# optax.inject_hyperparams


def test_static_args_are_every_argument_but_the_injectable():
    # `STATIC_ARGS` is built from `Config`'s fields; the factories' signatures are
    # written out by hand. (`quad` and `skew` take the same arguments: see above.)
    names = [n for n, _ in _parameters("quad")]
    assert len(set(wk.STATIC_ARGS)) == len(wk.STATIC_ARGS)
    assert set(wk.STATIC_ARGS) == {n for n in names if n not in INJECTABLE}


def test_inject_hyperparams_in_one_line():
    params = {"w": jnp.linspace(-1, 1, 20, dtype=F32).reshape(5, 4), "b": jnp.ones(4, F32)}
    grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.5, params)
    tx = optax.inject_hyperparams(wk.skew, static_args=wk.STATIC_ARGS)(
        learning_rate=3e-3, weight_decay=1e-4
    )
    state = tx.init(params)
    assert set(state.hyperparams) == set(INJECTABLE)
    step = jax.jit(tx.update)
    full, _ = step(grads, state, params)
    halved = {**state.hyperparams, "learning_rate": state.hyperparams["learning_rate"] / 2}
    half, _ = step(grads, state._replace(hyperparams=halved), params)
    # Halving is exact in binary floating point, so the update halves bit for bit.
    for u, h in zip(jax.tree.leaves(full), jax.tree.leaves(half), strict=True):
        assert np.asarray(u / 2).tobytes() == np.asarray(h).tobytes()
        assert np.any(np.asarray(u) != 0)
    # and it is `skew`'s update with the same numbers
    plain = wk.skew(learning_rate=3e-3, weight_decay=1e-4)
    expected, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    for u, e in zip(jax.tree.leaves(full), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(e), rtol=1e-6, atol=0)


# The numbers `inject_hyperparams` turns into arrays: the number defaults, and `dtype`
# (a class is callable, so it is taken for a schedule).
_INJECTED_BY_MISTAKE = (
    "b1",
    "max_size_dense",
    "preconditioner_lr",
    "preconditioner_init_scale",
    "dtype",
    "block_size",
    "pipeline_axis_size",
    "noise_scale",
    "preconditioner_update_probability",
)

# Run without the suite's runtime type checker, which would refuse the first array by its
# annotation before `Config` could name them all (a wrong type, as a user's checker would).
_WITHOUT_STATIC_ARGS = """
import jax.numpy as jnp, optax, wkron_eqx as wk
for static_args in [(), ("block_size", "dtype")]:
    try:
        tx = optax.inject_hyperparams(wk.skew, static_args=static_args)(learning_rate=1e-3)
        tx.init({"w": jnp.ones((4, 3))})
    except ValueError as e:
        print(str(e).replace("\\n", " "))
"""


def test_inject_hyperparams_without_static_args_names_them_all_at_once():
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_STATIC_ARGS],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    messages = run.stdout.splitlines()
    assert len(messages) == 2, run.stdout + run.stderr
    for message, static in zip(messages, [(), ("block_size", "dtype")], strict=True):
        assert f"static_args={wk.STATIC_ARGS!r}" in message, message
        for name in _INJECTED_BY_MISTAKE:
            assert (f"`{name}`" in message.split("must be")[0]) == (name not in static), name
        assert "`learning_rate`" not in message.split("must be")[0]


def test_config_with_arrays_names_them_all_at_once():
    with pytest.raises(ValueError) as info:
        wk.Config(b1=jnp.asarray(0.9), block_size=jnp.asarray(8), noise_scale=jnp.asarray(0.0))
    message = str(info.value)
    assert message.startswith("`b1`, `block_size`, `noise_scale` must be Python values")
    assert f"static_args={wk.STATIC_ARGS!r}" in message


# ---------------------------------------------------------------------------------------
# the package namespace


def test_all_is_sorted_and_lists_every_public_name():
    public = {
        name
        for name, value in vars(wk).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert wk.__all__ == sorted(wk.__all__)
    assert set(wk.__all__) == public
