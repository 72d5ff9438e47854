"""`matmul_dtype`: the dtype the Kronecker products run in, apart from the storage dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wkron_eqx as wk

from .helpers import normal_tree, run_steps


# A dense leaf (two tile sizes), a large leaf (diagonal side + dense strip) and a bias.
SHAPES = {"w": (40, 24), "v": (24, 24), "table": (300, 12), "b": (24,)}


def _run(steps=12, **kwargs):
    """`steps` steps from params drawn with seed 0, gradients with seeds 1, 2, ...:
    the updates of every step and the final state."""
    tx = wk.scale_by_skew(b1=0.0, max_size_dense=64, block_size=16, noise_scale=0.0, **kwargs)
    grads = [normal_tree(SHAPES, t + 1) for t in range(steps)]
    updates, states = run_steps(tx, normal_tree(SHAPES, 0), grads)
    return updates, states[-1]


def _factor_dtypes(state):
    arrays = [d.Ql for d in state.dense] + [d.Qr for d in state.dense]
    leaves = state.leaf_states()
    arrays += [s.Ql for s in leaves] + [s.Qr for s in leaves]
    return {a.dtype for a in arrays if a is not None}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default is per backend")
def test_bfloat16_default_on_cpu_runs_the_products_in_float32():
    auto, auto_state = _run(3, dtype=jnp.bfloat16)
    f32, _ = _run(3, dtype=jnp.bfloat16, matmul_dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(f32), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... while the factors are still stored in bfloat16
    assert _factor_dtypes(auto_state) == {jnp.dtype(jnp.bfloat16)}


def test_float32_products_are_closer_to_the_float32_run_than_bfloat16_products():
    exact, _ = _run(dtype=jnp.float32)
    wide, wide_state = _run(dtype=jnp.bfloat16, matmul_dtype=jnp.float32)
    narrow, narrow_state = _run(dtype=jnp.bfloat16, matmul_dtype=jnp.bfloat16)
    assert _factor_dtypes(wide_state) == _factor_dtypes(narrow_state) == {jnp.dtype(jnp.bfloat16)}

    def error(run):
        errs = [
            np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            / np.linalg.norm(np.asarray(b, np.float64))
            for step, ref in zip(run, exact, strict=True)
            for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(ref), strict=True)
            if a.ndim == 2
        ]
        return float(np.mean(errs))

    wide_err, narrow_err = error(wide), error(narrow)
    # bfloat16 storage alone costs ~0.4% per entry; rounding every product costs more
    assert wide_err < 0.7 * narrow_err, (wide_err, narrow_err)
    assert wide_err < 0.05


def test_float32_storage_with_bfloat16_products():
    out, state = _run(3, dtype=jnp.float32, matmul_dtype=jnp.bfloat16)
    assert _factor_dtypes(state) == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
