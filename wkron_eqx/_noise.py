"""The exploration noise of a factor update: a counter-based Gaussian draw per stack.

Element `j` of a draw is a pure function of `(seed, step, j)`: a small integer hash of
the counter, turned into a normal value by the inverse CDF. It is plain elementwise
code, so XLA fuses it into whatever consumes the noise; it is kept small on purpose
(two rounds of a multiply-xorshift hash instead of a 20-round block cipher) because XLA
may copy it into several consumers, and every copy is code to compile. The noise only
has to be Gaussian, independent across elements and steps, and reproducible; it is not
used for anything that needs cryptographic quality.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Float32, UInt32


_SEED = 0x5EED


def _mix(x: UInt32[Array, "*s"]) -> UInt32[Array, "*s"]:
    # "lowbias32" (C. Wellons, hash-prospector): a bijection of uint32 with low bias.
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def step_key(seed: UInt32[Array, ""], step: UInt32[Array, ""]) -> UInt32[Array, ""]:
    """The key of one step's draw (a scalar, computed once)."""
    return _mix(_mix(step) ^ seed)


def hash32(counter: UInt32[Array, "*s"], key: UInt32[Array, ""]) -> UInt32[Array, "*s"]:
    """32 well-mixed bits for each counter under `key`: `mix(mix(counter) ^ key)`.

    Hashing the counter before the key enters makes the draws of two keys different
    functions of the counter, not permutations of one sequence.
    """
    return _mix(_mix(counter) ^ key)


def _to_normal(word: UInt32[Array, "*s"]) -> Float32[Array, "*s"]:
    # (word >> 9) is uniform on 0 .. 2^23 - 1; offset by 1/2 (exact in float32), the
    # grid is symmetric and stops 2^-23 short of +-1, so erfinv stays finite.
    u = ((word >> np.uint32(9)).astype(jnp.float32) + 0.5) * np.float32(2.0**-22) - 1
    return np.float32(math.sqrt(2)) * jax.lax.erf_inv(u)


def standard_normal(
    seed: UInt32[Array, ""], step: UInt32[Array, ""], size: int
) -> Float32[Array, " n"]:
    """`size` float32 `N(0, 1)` values: draw `j` is `sqrt(2) erfinv(u_j)`, with `u_j` in
    `(-1, 1)` from the top 23 bits of `hash32(j, step_key(seed, step))`."""
    if size >= 2**32:
        raise ValueError(f"cannot draw {size} noise values in one step: over 2**32")
    return _to_normal(hash32(jax.lax.iota(jnp.uint32, size), step_key(seed, step)))


def add_noise(
    x: Float[Array, "stack *entry"],
    step: Array,
    scale: float | Float[Array, ""],
    valid: Bool[Array, "stack *entry"] | None = None,
    entry_index: np.ndarray | None = None,
) -> Float[Array, "stack *entry"]:
    """`x` plus `scale * N(0, 1)` noise where `valid` (default: everywhere).

    Element `j` of entry `i` of the stack gets draw `entry_index[i] * entry_size + j`
    of the step's stream (`entry_index` defaults to `0, 1, ...`). A stack's noise is
    thus a pure function of the step and the static plan: it does not depend on the
    values of anything else, nor on the order stacks are visited. Passing the index of
    each entry among the real ones makes pipeline dummies (masked out by `valid`)
    shift nothing. Stacks of equal shape see the same draws; each stack's factors are
    fitted on their own, so that correlation across stacks does not matter.
    """
    if (isinstance(scale, int | float) and scale == 0) or x.size == 0:
        return x
    stack, entry_size = x.shape[0], math.prod(x.shape[1:])
    if entry_index is None:
        entry_index = np.arange(stack)
    if int(np.max(entry_index) + 1) * entry_size >= 2**32:
        raise ValueError(f"cannot draw {stack * entry_size} noise values in one step: over 2**32")
    base = jnp.asarray(np.asarray(entry_index, np.uint32) * np.uint32(entry_size))
    counter = base[:, None] + jax.lax.iota(jnp.uint32, entry_size)[None, :]
    word = hash32(counter, step_key(jnp.uint32(_SEED), jnp.asarray(step).astype(jnp.uint32)))
    # (A traced scale: `damping`'s damping of the whitening.)
    factor = np.float32(scale) if isinstance(scale, int | float) else scale.astype(jnp.float32)
    eps = (_to_normal(word) * factor).reshape(x.shape).astype(x.dtype)
    return x + (eps if valid is None else jnp.where(valid, eps, 0))


_ROUNDING_SEED = 0x5B0F

# The rounding streams of one step, distinct so that no two arrays draw the same bits: a
# stack's left and right factors, the 1-D factors, and the momentum (this plus the leaf's
# index).
LEFT_STREAM, RIGHT_STREAM, ONE_D_STREAM, MOMENTUM_STREAM = 1, 2, 3, 16


def stochastic_round(
    x: Float[Array, "*s"], dtype, step: Array | int, stream: Array | int = 0
) -> Float[Array, "*s"]:
    """`x` rounded to `dtype`, up or down at random with the probabilities that make the
    rounding unbiased (`E[round(x)] = x`), where `dtype` is narrower than float32.

    For bfloat16 (the upper 16 bits of a float32), 16 random bits are added to the low
    half of `x`'s float32 bits before they are cut off: `x` rounds up with probability
    equal to its distance from the lower neighbour, in ulps. The bits are
    `hash32(j, key)` with a key from `(stream, step)`, so the same run draws the same
    bits and no key lives in the state. Non-finite values round as usual; another
    target dtype (float32) is a plain cast.
    """
    dtype = jnp.dtype(dtype)
    if dtype != jnp.dtype(jnp.bfloat16) or x.size == 0:
        return x.astype(dtype)
    x32 = x.astype(jnp.float32)
    seed = jnp.uint32(_ROUNDING_SEED) ^ jnp.asarray(stream).astype(jnp.uint32)
    key = step_key(seed, jnp.asarray(step).astype(jnp.uint32))
    noise = hash32(jax.lax.iota(jnp.uint32, x32.size), key).reshape(x32.shape) >> np.uint32(16)
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    cut = (bits + noise) & np.uint32(0xFFFF0000)
    rounded = jax.lax.bitcast_convert_type(cut, jnp.float32)
    return jnp.where(jnp.isfinite(x32), rounded, x32).astype(dtype)
