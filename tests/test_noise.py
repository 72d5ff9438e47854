"""The noise generator: the hash against NumPy, the distribution, the masking."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from wkron_eqx._noise import add_noise, hash32, standard_normal, step_key


@settings(max_examples=20, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_hash_matches_a_numpy_rederivation(words):
    def mix(x):
        x = np.uint64(x)
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
        x ^= x >> np.uint64(15)
        x = (x * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
        return x ^ (x >> np.uint64(16))

    key = int(mix(mix(11) ^ np.uint64(3)))
    got = np.asarray(hash32(jnp.asarray(np.array(words, np.uint32)), jnp.uint32(key)))
    expected = [int(mix(mix(w) ^ np.uint64(key))) for w in words]
    np.testing.assert_array_equal(got.astype(np.uint64), np.array(expected, np.uint64))
    assert int(step_key(jnp.uint32(3), jnp.uint32(11))) == key


def _cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_standard_normal_distribution():
    n = 1 << 18
    z = np.asarray(standard_normal(jnp.uint32(3), jnp.uint32(11), n), np.float64)
    assert np.all(np.isfinite(z))
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(np.mean(z**3)) < 5 * math.sqrt(15) * se
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96) * se
    # Kolmogorov-Smirnov against the normal CDF: the 0.1% critical value is 1.95/sqrt(n).
    grid = np.sort(z)
    cdf = _cdf(grid)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 * se
    # The most extreme values the 23-bit grid allows are finite and about 5.3 sigma.
    assert np.max(np.abs(z)) < 5.5


def test_keys_and_entries_are_uncorrelated():
    draw = lambda k0, k1: np.asarray(standard_normal(jnp.uint32(k0), jnp.uint32(k1), 8192))
    base = draw(0, 5)
    n = base.size
    # Another step (k1), another seed (k0), and the neighbouring entry.
    for other in (draw(0, 6), draw(1, 5), np.roll(base, 1)):
        assert abs(np.corrcoef(base, other)[0, 1]) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_noise_masks_invalid_entries_and_numbers_real_entries(dtype):
    x = jnp.zeros((4, 3, 5), dtype)
    valid = jnp.zeros((4, 3, 5), bool).at[:3, :2, :4].set(True)  # entry 3 is a dummy
    out = np.asarray(add_noise(x, jnp.int32(7), 0.5, valid), np.float32)
    assert out.shape == (4, 3, 5)
    assert np.all(out[:3, :2, :4] != 0)
    assert np.all(out[3] == 0) and np.all(out[:, 2, :] == 0) and np.all(out[:, :, 4] == 0)
    # The values are the scaled draw of the step, entry after entry.
    draw = 0.5 * np.asarray(standard_normal(jnp.uint32(0x5EED), jnp.uint32(7), 4 * 15))
    expected = draw.reshape(4, 3, 5)[:3, :2, :4].astype(dtype)
    np.testing.assert_array_equal(out[:3, :2, :4], np.asarray(expected, np.float32))
    # The same step gives the same values, another step others.
    np.testing.assert_array_equal(
        np.asarray(add_noise(x, jnp.int32(7), 0.5, valid), np.float32), out
    )
    assert not np.array_equal(np.asarray(add_noise(x, jnp.int32(8), 0.5, valid), np.float32), out)
    # A dummy placed first, with the real entries numbered 0, 1, 2, shifts nothing.
    shifted = jnp.concatenate([jnp.zeros((1, 3, 5), bool), valid[:3]])
    moved = add_noise(x, jnp.int32(7), 0.5, shifted, np.array([0, 0, 1, 2]))
    np.testing.assert_array_equal(np.asarray(moved, np.float32)[1:], out[:3])
    # No noise at scale 0: the input itself.
    assert add_noise(x, jnp.int32(7), 0.0, valid) is x


def test_noise_is_plain_elementwise_code_not_jax_random():
    """The compiled draw has no `threefry2x32` call and no array-sized while loop."""
    x = jnp.zeros((8, 64, 64))
    text = jax.jit(lambda x, t: add_noise(x, t, 1e-3)).lower(x, jnp.int32(0)).as_text()
    assert "threefry" not in text and "while" not in text
