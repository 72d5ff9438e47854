"""`preconditioner_stats`: kind, tiles and padding against the layout; Lipschitz estimates,
factor RMS and (opted in) condition numbers against NumPy on each factor's valid part;
the default computed without any decomposition."""

import functools
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import wkron_eqx as wk
from wkron_eqx._layout import plan_tree


F32 = jnp.float32
CHEAP = {"kind", "tiles", "padding_fraction", "Ll", "Lr", "rms_left", "rms_right"}
CONDITION = {"cond_left", "cond_right"}


def _stats_tree():
    params = {
        "dense": jnp.zeros((27, 32)),  # 2 x 2 tiles of 16 (edge tiles of 11 rows)
        "large": jnp.zeros((40, 20)),  # 40 > max_size_dense: diagonal left, 2 strips
        "bias": jnp.zeros((7,)),
        "scanned": jnp.zeros((3, 12, 10)),  # 3 layers of one 12x10 tile
    }
    scanned = {"dense": False, "large": False, "bias": False, "scanned": True}
    return params, scanned


def _transform(scanned, **kwargs):
    return wk.scale_by_quad(
        dtype=F32, block_size=16, max_size_dense=32, scanned_layers=scanned, **kwargs
    )


def _valid(factor: np.ndarray, valid: int) -> np.ndarray:
    factor = np.asarray(factor, np.float64)
    return factor[:valid] if factor.ndim == 1 else factor[:valid, :valid]


def _numpy_rms(factor: np.ndarray, valid: int) -> float:
    """Root mean square of the singular values of the valid part (of the entries, for a
    diagonal factor)."""
    q = _valid(factor, valid)
    sv = np.abs(q) if q.ndim == 1 else np.linalg.svd(q, compute_uv=False)
    return float(np.sqrt(np.mean(sv**2)))


def _numpy_cond(factor: np.ndarray, valid: int) -> float:
    q = _valid(factor, valid)
    return float(np.abs(q).max() / np.abs(q).min()) if q.ndim == 1 else float(np.linalg.cond(q))


def _factors_per_leaf(state, params, scanned):
    """`{leaf: [(Ql, valid_rows, Ll, Qr, valid_cols, Lr), ...]}` read from the state along
    the layout: dense tiles from the buckets, others from the leaf's own state."""
    names = sorted(params)  # the flattening order of a dict
    plan = plan_tree(
        tuple(params[n].shape for n in names), tuple(scanned[n] for n in names), 16, 32, 1
    )
    out = {n: [] for n in names}
    for bucket, dense in zip(plan.buckets, state.dense, strict=True):
        start = 0
        for seg in bucket.segments:
            for i in range(start, start + seg.count):
                left = (dense.Ql[i], dense.valid_rows[i], dense.Ll[i])
                out[names[seg.leaf]].append((*left, dense.Qr[i], dense.valid_cols[i], dense.Lr[i]))
            start += seg.count
    for name, leaf_plan in zip(names, plan.leaves, strict=True):
        leaf = state.leaf_tree()[name]
        if leaf_plan.kind != wk.DENSE_PATH:
            real = leaf_plan.layout.strips if leaf_plan.kind == wk.LARGE_PATH else leaf_plan.batch
            for i in range(real):
                left = (leaf.Ql[i], leaf.valid_rows[i], leaf.Ll[i])
                right = (
                    (None,) * 3 if leaf.Qr is None else (leaf.Qr[i], leaf.valid_cols[i], leaf.Lr[i])
                )
                out[name].append((*left, *right))
    return plan, out


@functools.cache
def _trained():
    """Five QUAD steps on the stats tree; the state, its stats in both modes computed
    inside `jit`, and the factors of every leaf read from the state along the layout."""
    params, scanned = _stats_tree()
    tx = _transform(scanned, noise_scale=0.0)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    step = jax.jit(tx.update)
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), F32), params)
        _, state = step(grads, state)
    stats = jax.jit(wk.preconditioner_stats, static_argnames="condition_numbers")
    cheap, full = stats(state), stats(state, condition_numbers=True)
    plan, factors = _factors_per_leaf(state, params, scanned)
    return state, cheap, full, dict(zip(sorted(params), plan.leaves, strict=True)), factors


# kind, tiles and padding fraction of each leaf of `_stats_tree`, by hand
_EXPECTED_STATS = {
    "dense": (wk.DENSE_PATH, 4, 1 - 27 * 32 / (4 * 16 * 16)),
    # strips of width 16 and 4 along the short side, both stored 16 wide
    "large": (wk.LARGE_PATH, 2, 1 - 40 * 20 / (2 * 40 * 16)),
    "bias": (wk.ONE_D_PATH, 1, 0.0),
    "scanned": (wk.DENSE_PATH, 3, 1 - 12 * 10 / (16 * 16)),
}
_NAMES = sorted(_EXPECTED_STATS)


@pytest.mark.parametrize("name", _NAMES)
def test_cheap_stats_against_layout_and_numpy(name):
    _, cheap, _, plans, factors = _trained()
    s, leaf_plan, tiles_of_leaf = cheap[name], plans[name], factors[name]
    kind, tiles, padding = _EXPECTED_STATS[name]
    sides = ("left",) if kind == wk.ONE_D_PATH else ("left", "right")
    assert set(s) == {"kind", "tiles", "padding_fraction"} | {
        k for side in sides for k in (f"L{side[0]}", f"rms_{side}")
    }
    assert int(s["kind"]) == kind == leaf_plan.kind
    layout = leaf_plan.layout  # a large leaf's stack also holds pipeline dummies
    layout_tiles = layout.strips if kind == wk.LARGE_PATH else layout.stack
    assert int(s["tiles"]) == tiles == layout_tiles == len(tiles_of_leaf)
    np.testing.assert_allclose(s["padding_fraction"], padding, rtol=1e-6, atol=1e-7)
    for k, side in enumerate(sides):
        factor, valid, lipschitz = (3 * k, 3 * k + 1, 3 * k + 2)
        expected_L = [float(t[lipschitz]) for t in tiles_of_leaf]
        np.testing.assert_array_equal(s[f"L{side[0]}"], np.asarray(expected_L, np.float32))
        assert bool(jnp.all(s[f"L{side[0]}"] > 0))  # the factors have been updated
        rms = [_numpy_rms(t[factor], int(t[valid])) for t in tiles_of_leaf]
        np.testing.assert_allclose(s[f"rms_{side}"], rms, rtol=1e-5)


@pytest.mark.parametrize("name", _NAMES)
def test_condition_numbers_when_opted_in(name):
    _, cheap, full, _, factors = _trained()
    s = full[name]
    sides = ("left",) if int(s["kind"]) == wk.ONE_D_PATH else ("left", "right")
    assert set(s) == set(cheap[name]) | {f"cond_{side}" for side in sides}
    for key in cheap[name]:  # the cheap part is the same in both modes
        np.testing.assert_array_equal(s[key], cheap[name][key])
    for k, side in enumerate(sides):
        cond = [_numpy_cond(t[3 * k], int(t[3 * k + 1])) for t in factors[name]]
        np.testing.assert_allclose(s[f"cond_{side}"], cond, rtol=2e-3)
    # after a few steps the factors have moved away from the identity
    assert float(jnp.max(s["cond_left"])) > 1.0 + 1e-3


def _poison_padding(state):
    """`state` with NaN over the padding of every factor (and over pipeline dummies)."""

    def poison(Q, valid):
        inside = np.arange(Q.shape[-1])[None, :] < np.asarray(valid)[:, None]
        if Q.ndim == 3:
            inside = inside[:, :, None] & inside[:, None, :]
        return jnp.where(jnp.asarray(inside), Q, jnp.nan)

    dense = tuple(
        d.replace(Ql=poison(d.Ql, d.valid_rows), Qr=poison(d.Qr, d.valid_cols)) for d in state.dense
    )
    poisoned = lambda leaf: leaf.replace(
        Ql=poison(leaf.Ql, leaf.valid_rows),
        Qr=None if leaf.Qr is None else poison(leaf.Qr, leaf.valid_cols),
    )
    return state._replace(
        dense=dense,
        large=tuple(poisoned(leaf) for leaf in state.large),
        one_d=tuple(poisoned(leaf) for leaf in state.one_d),
    )


def test_cheap_stats_read_only_the_valid_part():
    state, cheap, _, _, _ = _trained()
    poisoned = _poison_padding(state)
    factors = [d.Ql for d in poisoned.dense] + [d.Qr for d in poisoned.dense]
    own = poisoned.large + poisoned.one_d
    factors += [f for leaf in own for f in (leaf.Ql, leaf.Qr) if f is not None]
    assert sum(int(jnp.isnan(f).sum()) for f in factors) > 0  # there is padding to poison
    stats = jax.jit(wk.preconditioner_stats)(poisoned)
    jax.tree.map(np.testing.assert_array_equal, stats, cheap)


def test_known_shape_at_init():
    # a 27x32 kernel in a 256 block: one tile stored as 32x32 (right-sized, not 256x256);
    # the factors start at `preconditioner_init_scale` times the identity
    state = wk.scale_by_skew(preconditioner_init_scale=2.0).init({"k": jnp.zeros((27, 32))})
    stats = wk.preconditioner_stats(state)["k"]
    assert int(stats["kind"]) == wk.DENSE_PATH and int(stats["tiles"]) == 1
    np.testing.assert_allclose(stats["padding_fraction"], 1 - 27 * 32 / (32 * 32))
    for key in ("Ll", "Lr"):  # not updated yet
        np.testing.assert_array_equal(stats[key], [0.0])
    for key in ("rms_left", "rms_right"):
        np.testing.assert_allclose(stats[key], [2.0], rtol=1e-6)
    full = wk.preconditioner_stats(state, condition_numbers=True)["k"]
    np.testing.assert_array_equal(full["cond_left"], [1.0])
    np.testing.assert_array_equal(full["cond_right"], [1.0])


# What a decomposition looks like in a lowered program: jax's `svd`/`eigh` functions,
# LAPACK's (`gesdd`, `gesvd`, `syevd`, `geev`) and cuSOLVER's custom calls.
_DECOMPOSITION = re.compile(r"svd|eig|gesdd|gesvd|syev|heev|geev", re.IGNORECASE)


def _decompositions(lowered_text: str) -> set[str]:
    """The called functions, custom-call targets and op names of a lowered program that
    name a decomposition (only those: a parameter's name never counts)."""
    callees = re.findall(r"@([\w.$-]+)", lowered_text)
    ops = re.findall(r"\b((?:stablehlo|chlo|mhlo)\.[\w.]+)", lowered_text)
    return {name for name in callees + ops if _DECOMPOSITION.search(name)}


def test_default_stats_lower_without_a_decomposition():
    params, scanned = _stats_tree()
    state = _transform(scanned).init(params)
    stats = jax.jit(wk.preconditioner_stats, static_argnames="condition_numbers")
    cheap = stats.lower(state).as_text()
    full = stats.lower(state, condition_numbers=True).as_text()
    assert _decompositions(cheap) == set()
    assert _decompositions(full)  # the reader does see one when it is there


# Without a runtime type checker a wrong type gets the function's own `ValueError`; under
# one (the suite runs with jaxtyping + beartype) the annotation refuses it first.
@pytest.mark.parametrize("jitted", [False, True], ids=["int", "traced"])
def test_condition_numbers_must_be_a_python_bool(jitted):
    params, scanned = _stats_tree()
    state = _transform(scanned).init(params)
    stats = jax.jit(wk.preconditioner_stats) if jitted else wk.preconditioner_stats
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)) as info:
        stats(state, condition_numbers=True if jitted else 1)
    message = str(info.value)
    if info.type is ValueError:
        assert "`condition_numbers` must be a Python bool" in message, message
        assert "static" in message or not jitted, message
    else:
        assert "condition_numbers" in message, message
