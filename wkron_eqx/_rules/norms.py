"""A cheap lower bound of a matrix's spectral norm, for Lipschitz tracking."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar


def spectral_norm_lower_bound(M: Float[Array, "n n"], iters: int = 10) -> Scalar:
    """Estimate `||M||_2` from below by power iteration.

    The start vector is the row of `M` with the largest energy (for a PSD matrix it
    already leans toward the top eigenvector), so no random draw is needed and the
    estimate is deterministic. `M` is scaled by its max-abs entry first, so the
    iteration cannot overflow; an all-zero `M` gives 0.

    **Arguments:**

    - `M`: a square matrix (symmetric PSD or skew-symmetric in practice).
    - `iters`: power-iteration steps.

    **Returns:**

    A scalar `b` with `b <= ||M||_2` (up to rounding), in `M`'s dtype.
    """
    scale = jnp.max(jnp.abs(M))
    safe = jnp.where(scale > 0, scale, 1)
    M = M / safe
    x = M[jnp.argmax(jnp.sum(M * M, axis=1))]

    def power_step(_, x):
        x = x @ M
        return x / jnp.maximum(jnp.max(jnp.abs(x)), jnp.finfo(M.dtype).tiny)

    x = jax.lax.fori_loop(0, iters, power_step, x)
    x = x / jnp.maximum(jnp.linalg.norm(x), jnp.finfo(M.dtype).tiny)
    return jnp.linalg.norm(x @ M) * scale
