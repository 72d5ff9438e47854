"""The exploration noise of a factor update: one fused draw per step for the whole tree.

`jax.random.normal` over every stacked entry was the single most expensive part of a
step on CPU: its Threefry rounds run as a rolled loop that writes two full-size arrays
per round, and it hashes once per output word anyway. Here entry `i` of a step's draw
is a pure function of `(step, i)`: a Threefry-2x32 hash written out as plain integer
ops, which XLA fuses with the inverse-CDF transform into one elementwise kernel.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float32, UInt32


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotl(x: Array, r: int) -> Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(
    k0: UInt32[Array, ""], k1: UInt32[Array, ""], x0: UInt32[Array, "*s"], x1: UInt32[Array, "*s"]
) -> tuple[UInt32[Array, "*s"], UInt32[Array, "*s"]]:
    """The Threefry-2x32 block cipher (20 rounds) of Salmon et al. (2011), elementwise.

    It is bit-identical to `jax.extend.random.threefry_2x32`, but built from ordinary
    integer ops so that it fuses with whatever consumes its output.
    """
    keys = (k0, k1, k0 ^ k1 ^ np.uint32(_KEY_PARITY))
    x0, x1 = x0 + k0, x1 + k1
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def standard_normal(
    k0: UInt32[Array, ""], k1: UInt32[Array, ""], size: int
) -> Float32[Array, " n"]:
    """`size` float32 `N(0, 1)` values from the key `(k0, k1)`.

    Entry `i` hashes the counter `(i, 0)`; the top 23 bits of the hash give a uniform
    `u` in `(-1, 1)` on a grid of step `2^-22`, and the value is `sqrt(2) erfinv(u)`
    (the inverse CDF, as `jax.random.normal` does).
    """
    if size >= 2**32:
        raise ValueError(f"cannot draw {size} noise values in one step: over 2**32")
    index = jax.lax.iota(jnp.uint32, size)
    word, _ = threefry2x32(k0, k1, index, jnp.zeros_like(index))
    # (word >> 9) is uniform on 0 .. 2^23 - 1; offset by 1/2 (exact in float32), the
    # grid is symmetric and stops 2^-23 short of +-1, so erfinv stays finite.
    u = ((word >> np.uint32(9)).astype(jnp.float32) + 0.5) * np.float32(2.0**-22) - 1
    return np.float32(math.sqrt(2)) * jax.lax.erf_inv(u)


class NoiseSource:
    """Hands out consecutive slices of one `noise_scale * N(0, 1)` draw per step.

    The draw is one fused kernel (hash, inverse CDF, scale) over every real stacked
    entry, so its code is compiled once however many stacks there are. The cursor is
    trace-time bookkeeping: the slices are static, so the result is a pure function of
    the step. Pipeline dummies sit at the end of a stack and draw nothing, so padding
    never changes a real entry's noise.
    """

    def __init__(self, step: Array, seed: int, scale: float, total: int):
        step = jnp.asarray(step)

        def draw():
            k1 = step.astype(jnp.uint32)
            eps = standard_normal(jnp.uint32(seed), k1, total)
            return eps * np.float32(scale)

        # The draw sits in its own computation (a `cond` whose other branch is never
        # taken: steps count up from 0) so that it is materialised once. Inline, XLA
        # fuses the whole hash into every consumer slice and compiles and runs it once
        # per stack; `optimization_barrier` does not stop that on CPU.
        self._eps = jax.lax.cond(step >= 0, draw, lambda: jnp.zeros((total,), jnp.float32))
        self._cursor = 0

    def add(
        self, x: Array, valid: Bool[Array, "..."] | None = None, real: int | None = None
    ) -> Array:
        """`x` plus the next noise values, only where `valid` (default: everywhere) and
        only in the first `real` entries of the stack (default: all)."""
        real = x.shape[0] if real is None else real
        size = real * math.prod(x.shape[1:])
        start, self._cursor = self._cursor, self._cursor + size
        if self._cursor > self._eps.size:
            raise ValueError("NoiseSource ran out of noise; the plan's size is wrong.")
        eps = self._eps[start : self._cursor].reshape((real,) + x.shape[1:]).astype(x.dtype)
        if real < x.shape[0]:
            eps = jnp.pad(eps, [(0, x.shape[0] - real)] + [(0, 0)] * (x.ndim - 1))
        return x + (eps if valid is None else jnp.where(valid, eps, 0))
