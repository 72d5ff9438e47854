"""`mm`: products in the factors' dtype, accumulated in float32."""

import jax.numpy as jnp
import numpy as np
import pytest

from wkron_eqx._linalg import mm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mm_is_the_float32_product_rounded_once(dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((3, 64, 48)), dtype)
    b = jnp.asarray(rng.standard_normal((3, 48, 32)), dtype)
    out = mm(a, b)
    assert out.dtype == dtype and out.shape == (3, 64, 32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # Rounded once: within half a unit in the last place of the dtype (plus the float32
    # accumulation error), for every entry.
    eps = float(jnp.finfo(dtype).eps)
    err = np.abs(np.asarray(out, np.float64) - exact)
    assert np.all(err <= 0.5 * eps * np.abs(exact) + 48 * 1.2e-7 * np.abs(exact).max())
