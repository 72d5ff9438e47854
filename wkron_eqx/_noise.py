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

    def add(self, x: Array, valid: Bool[Array, "..."] | None = None) -> Array:
        """`x` plus the next `x.size` noise values, only where `valid` (default: all)."""
        start, self._cursor = self._cursor, self._cursor + x.size
        if self._cursor > self._eps.size:
            raise ValueError("NoiseSource ran out of noise; the plan's size is wrong.")
        eps = self._eps[start : self._cursor].reshape(x.shape)
        return x + (eps if valid is None else jnp.where(valid, eps, 0))
