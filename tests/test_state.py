"""`DenseState` / `LeafState` / `WhiteKronState`: fields as the reference, pure `replace`,
bit-exact dict/JSON/`eqx.tree_serialise_leaves` round trips, optax tree access, and the
runtime shape/dtype checks of the jaxtyping annotations."""

import dataclasses
import io
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

import wkron_eqx as wk

from .helpers import assert_bit_identical, bits


# The reference's constructor signatures (eformer 0.0.101's white_kron), in order.
DENSE_FIELDS = ["Ql", "Qr", "Ll", "Lr", "valid_rows", "valid_cols", "valid_count", "block_size"]
LEAF_FIELDS = [
    "kind",
    "scanned",
    "B",
    "shape",
    "merged",
    "nr",
    "nc",
    "block_size",
    "diag_left",
    "diag_right",
    "stack",
    "Ql",
    "Qr",
    "Ll",
    "Lr",
    "valid_rows",
    "valid_cols",
]

# Values whose bits a lossy round trip would change: NaN, infinities, -0, subnormals.
_SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.14159, -2.5e38], np.float32)


def _values(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(-(2**31), 2**31 - 1, shape), dtype)
    values = rng.standard_normal(shape).astype(np.float32).reshape(-1)
    values[: min(values.size, _SPECIAL.size)] = _SPECIAL[: values.size]
    return jnp.asarray(values.reshape(shape), dtype)


def _dense_state(tiles=3, rows=4, cols=8, dtype=jnp.bfloat16) -> wk.DenseState:
    return wk.DenseState(
        Ql=_values((tiles, rows, rows), dtype, 0),
        Qr=_values((tiles, cols, cols), dtype, 1),
        Ll=_values((tiles,), jnp.float32, 2),
        Lr=_values((tiles,), jnp.float32, 3),
        valid_rows=_values((tiles,), jnp.int32, 4),
        valid_cols=_values((tiles,), jnp.int32, 5),
        valid_count=tiles - 1,
        block_size=rows,
    )


def _leaf_state() -> wk.LeafState:
    # a LARGE leaf: diagonal left factor, dense right factor, `Lr` left out (None)
    return wk.LeafState(
        kind=int(wk.LARGE_PATH),
        scanned=1,
        B=2,
        shape=(40, 3, 1),
        merged=(40, 3),
        nr=1,
        nc=1,
        block_size=8,
        diag_left=True,
        diag_right=False,
        stack=2,
        Ql=_values((2, 40), jnp.bfloat16, 6),
        Qr=_values((2, 8, 8), jnp.float32, 7),
        Ll=_values((2,), jnp.float32, 8),
        valid_rows=_values((2,), jnp.int32, 9),
        valid_cols=_values((2,), jnp.int32, 10),
    )


# ---------------------------------------------------------------------------------------
# fields


@pytest.mark.parametrize("cls, names", [(wk.DenseState, DENSE_FIELDS), (wk.LeafState, LEAF_FIELDS)])
def test_fields_are_the_references(cls, names):
    assert issubclass(cls, eqx.Module)
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields] == names
    arrays = {"Ql", "Qr", "Ll", "Lr", "valid_rows", "valid_cols"}
    for f in fields:
        # everything but the arrays is static metadata, so it is not a pytree leaf
        assert f.metadata.get("static", False) == (f.name not in arrays), f.name


def test_only_arrays_are_leaves_and_treedefs_are_hashable():
    dense, leaf = _dense_state(), _leaf_state()
    assert len(jax.tree.leaves(dense)) == 6
    assert len(jax.tree.leaves(leaf)) == 5  # `Lr` is None
    for state in (dense, leaf):
        treedef = jax.tree.structure(state)
        assert hash(treedef) == hash(jax.tree.structure(state))


# ---------------------------------------------------------------------------------------
# replace


def test_replace_returns_a_new_state_and_leaves_the_old_one_unchanged():
    dense = _dense_state()
    before = jax.tree.map(bits, dense)
    new_ql = jnp.zeros_like(dense.Ql)
    replaced = dense.replace(Ql=new_ql, valid_count=1)
    assert replaced is not dense and type(replaced) is wk.DenseState
    assert replaced.Ql is new_ql and replaced.valid_count == 1
    assert replaced.Qr is dense.Qr and replaced.block_size == dense.block_size
    assert dense.valid_count == 2
    assert jax.tree.map(bits, dense) == before

    leaf = _leaf_state()
    replaced = leaf.replace(Lr=jnp.ones(2, jnp.float32), shape=(40, 3))
    assert leaf.Lr is None and leaf.shape == (40, 3, 1)
    assert replaced.shape == (40, 3) and bits(replaced.Lr) == bits(jnp.ones(2, jnp.float32))


# ---------------------------------------------------------------------------------------
# dict / JSON round trips


@pytest.mark.parametrize("make", [_dense_state, _leaf_state], ids=["dense", "leaf"])
def test_dict_roundtrip_is_exact(make):
    state = make()
    data = state.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(state)]
    back = type(state).from_dict(data)
    assert_bit_identical(back, state)
    for f in dataclasses.fields(state):
        assert type(getattr(back, f.name)) is type(getattr(state, f.name)), f.name


@pytest.mark.parametrize("make", [_dense_state, _leaf_state], ids=["dense", "leaf"])
def test_json_roundtrip_is_exact(make):
    state = make()
    text = state.to_json()
    assert isinstance(json.loads(text), dict)  # plain JSON
    back = type(state).from_json(text)
    assert_bit_identical(back, state)
    for f in dataclasses.fields(state):
        value, restored = getattr(state, f.name), getattr(back, f.name)
        if isinstance(value, jax.Array):
            assert isinstance(restored, jax.Array)
        else:
            # static metadata comes back with its type: tuples stay tuples, None stays None
            assert type(restored) is type(value) and restored == value, f.name
    # `to_json` passes its keyword arguments on to `json.dumps`
    assert json.loads(state.to_json(indent=2)) == json.loads(text)
    assert type(state).from_json(state.to_json(sort_keys=True)).to_json() == text


def test_json_roundtrip_of_bfloat16_and_int32bits():
    dense = _dense_state(dtype=jnp.bfloat16)
    back = wk.DenseState.from_json(dense.to_json())
    assert back.Ql.dtype == jnp.bfloat16 and back.valid_rows.dtype == jnp.int32
    assert np.isnan(np.asarray(back.Ql, np.float32)).any()  # NaN survived
    assert bits(back.Ql) == bits(dense.Ql)
    assert bits(back.valid_cols) == bits(dense.valid_cols)


# ---------------------------------------------------------------------------------------
# a whole optimizer state


def _optimizer_and_params():
    params = {
        "dense": jnp.ones((10, 6)),  # two 8x8-stored tiles
        "large": jnp.ones((40, 3)),  # a side above max_size_dense: diagonal x dense
        "vector": jnp.ones((5,)),
        "stacked": jnp.ones((2, 6, 4)),  # scanned: two layers of 6x4
        "scalar": jnp.ones(()),
    }
    scanned = {k: k == "stacked" for k in params}
    tx = wk.quad(block_size=8, max_size_dense=16, scanned_layers=scanned)
    return tx, params


def _scrambled(tree, seed=0):
    """Every array leaf replaced by values of its dtype and shape with awkward bits."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [_values(x.shape, x.dtype, seed + i) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


def test_optimizer_state_roundtrips_through_tree_serialise_leaves():
    tx, params = _optimizer_and_params()
    fresh = tx.init(params)
    state = _scrambled(fresh)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    back = eqx.tree_deserialise_leaves(buffer, fresh)
    assert_bit_identical(back, state)
    kinds = {name: leaf.kind for name, leaf in back[0].leaf_tree().items()}
    assert kinds == {
        "dense": wk.DENSE_PATH,
        "large": wk.LARGE_PATH,
        "vector": wk.ONE_D_PATH,
        "stacked": wk.DENSE_PATH,
        "scalar": wk.ONE_D_PATH,
    }


def test_top_level_state_is_a_named_tuple_for_optax_tree_access():
    tx, params = _optimizer_and_params()
    state = tx.init(params)
    inner = state[0]
    assert isinstance(inner, wk.WhiteKronState) and isinstance(inner, tuple)
    assert inner._fields[:2] == ("count", "mu")
    assert bits(optax.tree_utils.tree_get(state, "count")) == bits(jnp.zeros([], jnp.int32))
    assert bits(optax.tree_utils.tree_get(state, "skipped_steps")) == bits(jnp.zeros([], jnp.int32))
    moved = optax.tree_utils.tree_set(state, count=jnp.asarray(7, jnp.int32))
    assert int(optax.tree_utils.tree_get(moved, "count")) == 7
    assert int(optax.tree_utils.tree_get(state, "count")) == 0  # untouched
    scale_state = wk.scale_by_skew(block_size=8).init(params)
    assert int(optax.tree_utils.tree_get(scale_state, "count")) == 0


def test_slots_are_the_plans_positions_and_never_change():
    from wkron_eqx._kinds import leaf_slots

    tx, params = _optimizer_and_params()
    state = tx.init(params)
    expected = leaf_slots(state[0].plan.tree)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        assert [tuple(np.asarray(s).tolist()) for s in state[0].slots] == list(expected)
        assert all(s.dtype == jnp.int32 for s in state[0].slots)
        _, state = jax.jit(tx.update)(grads, state, params)


# ---------------------------------------------------------------------------------------
# runtime shape and dtype checks (the suite runs with `--jaxtyping-packages=wkron_eqx,...`)


def test_wrong_tile_count_is_caught():
    good = _dense_state(tiles=2, dtype=jnp.float32)
    with pytest.raises(jaxtyping.TypeCheckError):
        good.replace(Ll=jnp.zeros(3, jnp.float32))
    with pytest.raises(jaxtyping.TypeCheckError):
        wk.DenseState(**{**good.to_dict(), "Ll": jnp.zeros(3, jnp.float32)})


def test_wrong_factor_shape_is_caught():
    good = _dense_state(tiles=2, rows=4, dtype=jnp.float32)
    with pytest.raises(jaxtyping.TypeCheckError):
        good.replace(Ql=jnp.zeros((2, 4, 5), jnp.float32))  # not square


def test_wrong_dtype_is_caught():
    good = _dense_state(tiles=2, dtype=jnp.float32)
    with pytest.raises(jaxtyping.TypeCheckError):
        good.replace(Ll=jnp.zeros(2, jnp.int32))
    with pytest.raises(jaxtyping.TypeCheckError):
        good.replace(valid_rows=jnp.zeros(2, jnp.float32))
