"""The fused noise generator: the cipher against JAX's, the distribution, the masking."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.extend.random import threefry_2x32

from wkron_eqx._noise import NoiseSource, standard_normal, threefry2x32


@settings(max_examples=20, deadline=None)
@given(
    key=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    counters=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=16).filter(
        lambda c: len(c) % 2 == 0
    ),
)
def test_threefry_is_bit_identical_to_jax(key, counters):
    k = np.array(key, np.uint32)
    c = np.array(counters, np.uint32)
    half = len(c) // 2
    x0, x1 = threefry2x32(
        jnp.uint32(k[0]), jnp.uint32(k[1]), jnp.asarray(c[:half]), jnp.asarray(c[half:])
    )
    expected = np.asarray(threefry_2x32(jnp.asarray(k), jnp.asarray(c)))
    np.testing.assert_array_equal(np.concatenate([x0, x1]), expected)


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
def test_noise_source_masks_invalid_entries_and_dummies(dtype):
    x = jnp.zeros((4, 3, 5), dtype)
    valid = jnp.zeros((4, 3, 5), bool).at[:, :2, :4].set(True)
    total = 2 * 3 * 3 * 5  # two stacks of three real entries

    def source():
        return NoiseSource(jnp.int32(7), 0x5EED, 0.5, total)

    first = source()
    out = np.asarray(first.add(x, valid, real=3), np.float32)
    assert out.shape == (4, 3, 5)
    assert np.all(out[:3, :2, :4] != 0)
    assert np.all(out[3] == 0) and np.all(out[:, 2, :] == 0) and np.all(out[:, :, 4] == 0)
    # The real entries' values are the scaled draw, in order.
    draw = 0.5 * np.asarray(standard_normal(jnp.uint32(0x5EED), jnp.uint32(7), total))
    expected = draw[: 3 * 15].reshape(3, 3, 5)[:, :2, :4].astype(dtype)
    np.testing.assert_array_equal(out[:3, :2, :4], np.asarray(expected, np.float32))
    # The next stack continues the draw; the same step gives the same values.
    np.testing.assert_array_equal(np.asarray(source().add(x, valid, real=3), np.float32), out)
    second = np.asarray(first.add(x, valid, real=3), np.float32)
    assert not np.array_equal(second, out)
    # A dummy appended at the end does not move a real entry's noise.
    wider = source().add(
        jnp.zeros((6, 3, 5), dtype), jnp.pad(valid, ((0, 2), (0, 0), (0, 0))), real=3
    )
    np.testing.assert_array_equal(np.asarray(wider, np.float32)[:4], out)
    with pytest.raises(ValueError, match="ran out of noise"):
        first.add(x, valid, real=3)


def test_noise_is_one_fused_kernel_not_jax_random():
    """The compiled draw has no `threefry2x32` call and no array-sized while loop."""
    x = jnp.zeros((8, 64, 64))

    def f(x, t):
        return NoiseSource(t, 1, 1e-3, x.size).add(x)

    text = jax.jit(f).lower(x, jnp.int32(0)).as_text()
    assert "threefry" not in text and "while" not in text


def test_a_step_hashes_once_however_many_stacks():
    """The compiled step holds one copy of the hash: XLA must not fuse it into each
    stack's consumer (that multiplied compile time by the number of stacks)."""
    import wkron_eqx as wk

    params = {
        "a": jnp.zeros((30, 5)),
        "b": jnp.zeros((5, 30)),
        "c": jnp.zeros((16, 16)),
        "d": jnp.zeros((200, 3)),
        "e": jnp.zeros((7,)),
    }
    tx = wk.scale_by_quad(block_size=16, max_size_dense=64, dtype=jnp.float32)
    state = tx.init(params)
    text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    hashing = [block for block in text.split("\n\n") if " xor(" in block]
    assert len(hashing) == 1
