"""The exploration noise of a factor update, generated where it is added.

`jax.random.normal` over every stacked entry was the single most expensive part of a
step on CPU (its Threefry rounds run as a rolled loop that writes two full-size arrays
per round, and it hashes once per output word). Here each entry's noise is a pure
function of `(step, stream, flat index)`: a Threefry-2x32 hash written out as plain
integer ops, so XLA fuses hash, inverse-CDF transform, mask and add into the one
elementwise pass that forms `G + noise`. Nothing of the size of the stack is written
besides the result.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Shaped, UInt32


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


def _flat_index(shape: tuple[int, ...]) -> UInt32[Array, "*s"]:
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def standard_normal(
    k0: UInt32[Array, ""], k1: UInt32[Array, ""], stream: int, shape: tuple[int, ...], dtype
) -> Shaped[Array, "*s"]:
    """`N(0, 1)` values, one per entry of `shape`, from the key `(k0, k1)`.

    Entry `i` (row-major flat index) hashes the counter `(i, stream)`; the top 23 bits
    of the hash give a uniform `u` in `(-1, 1)` on a grid of step `2^-22`, and the
    value is `sqrt(2) erfinv(u)` (the inverse CDF, as `jax.random.normal` does), in
    float32 and then cast to `dtype`.
    """
    if math.prod(shape) >= 2**32:
        raise ValueError(f"cannot draw noise for a stack of shape {shape}: over 2**32 entries")
    word, _ = threefry2x32(k0, k1, _flat_index(shape), jnp.full(shape, stream, jnp.uint32))
    # (word >> 9) is uniform on 0 .. 2^23 - 1; offset by 1/2 (exact in float32), the
    # grid is symmetric and stops 2^-23 short of +-1, so erfinv stays finite.
    u = ((word >> np.uint32(9)).astype(jnp.float32) + 0.5) * np.float32(2.0**-22) - 1
    return (np.float32(math.sqrt(2)) * jax.lax.erf_inv(u)).astype(dtype)


class NoiseSource:
    """`noise_scale * N(0, 1)` for each stack of one step.

    Stacks are numbered in the order they ask (`stream`); the order is fixed by the
    static plan, so the result is a pure function of the step. Pipeline dummies sit at
    the end of a stack and are masked out, so padding never changes a real entry's
    noise.
    """

    def __init__(self, step: Array, seed: int, scale: float):
        self._k0 = jnp.uint32(seed)
        self._k1 = jnp.asarray(step).astype(jnp.uint32)
        self._scale = scale
        self._stream = 0

    def add(
        self, x: Array, valid: Bool[Array, "..."] | None = None, real: int | None = None
    ) -> Array:
        """`x` plus noise, only where `valid` (default: everywhere) and only in the
        first `real` entries of the stack (default: all)."""
        eps = standard_normal(self._k0, self._k1, self._stream, x.shape, jnp.float32)
        self._stream += 1
        keep = valid
        if real is not None and real < x.shape[0]:
            live = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) < real
            keep = live if keep is None else keep & live
        eps = (eps * np.float32(self._scale)).astype(x.dtype)
        return x + (eps if keep is None else jnp.where(keep, eps, 0))
