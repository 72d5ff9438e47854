"""Schedules for `preconditioner_update_probability`."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike


def precond_update_prob_schedule(
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: int = 500,
) -> Callable[[ArrayLike], Array]:
    """The usual schedule of psgd_jax's `kron`: update the factors every step for
    `flat_start` steps, then exponentially less often, down to `min_prob`.

    `p(n) = min(max(max_prob * exp(-decay * (n - flat_start)), min_prob), max_prob)`

    **Arguments:**

    - `max_prob`, `min_prob`: the bounds of the probability, in `(0, 1]`.
    - `decay`: the exponential decay rate per step after `flat_start`.
    - `flat_start`: steps before the decay starts.

    **Returns:**

    A function of the step (an int or a traced int array) returning a float32 `p`.
    """
    if not (0 < min_prob <= max_prob <= 1):
        raise ValueError(
            "`min_prob` and `max_prob` must satisfy 0 < min_prob <= max_prob <= 1, "
            f"got min_prob={min_prob!r}, max_prob={max_prob!r}."
        )
    if not decay >= 0:
        raise ValueError(f"`decay` must be a float >= 0, got {decay!r}.")

    # Not `optax.exponential_decay(max_prob, 1, exp(-decay), flat_start, min_prob)`: its
    # `power(exp(-decay), n)` differs from `exp(-decay * n)` in the last bits (which can move
    # an update by a step), and with `decay=0` (a rate of 1) it takes `min_prob` for an
    # upper bound and returns it at every step.
    def schedule(step: ArrayLike) -> Array:
        n = jnp.asarray(step, jnp.float32)
        p = max_prob * jnp.exp(-decay * (n - flat_start))
        return jnp.clip(p, min_prob, max_prob).astype(jnp.float32)

    return schedule
