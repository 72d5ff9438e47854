"""The exploration noise of a factor update: one draw per step for the whole tree."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool


class NoiseSource:
    """Hands out consecutive slices of one `noise_scale * N(0, 1)` draw.

    Drawing once per step keeps one random-number kernel in the compiled step however
    many stacks there are. The cursor is trace-time bookkeeping: the slices taken are
    static, so the result is a pure function of `key`.
    """

    def __init__(self, key: Array, scale: float, total: int, dtype):
        self._eps = jax.random.normal(key, (total,), dtype) * jnp.asarray(scale, dtype)
        self._cursor = 0

    def add(
        self, x: Array, valid: Bool[Array, "..."] | None = None, real: int | None = None
    ) -> Array:
        """`x` plus the next noise values, only where `valid` (default: everywhere).

        Only the first `real` entries of the stack (default: all) draw noise; the rest
        are pipeline dummies and get none, so padding never shifts the noise of a later
        stack (a leaf's result does not depend on `pipeline_axis_size`).
        """
        real = x.shape[0] if real is None else real
        size = real * x[0].size if x.ndim else x.size
        start, self._cursor = self._cursor, self._cursor + size
        if self._cursor > self._eps.size:
            raise ValueError("NoiseSource ran out of noise; the plan's size is wrong.")
        eps = self._eps[start : self._cursor].reshape((real,) + x.shape[1:])
        if real < x.shape[0]:
            eps = jnp.pad(eps, [(0, x.shape[0] - real)] + [(0, 0)] * (x.ndim - 1))
        return x + (eps if valid is None else jnp.where(valid, eps, 0))
