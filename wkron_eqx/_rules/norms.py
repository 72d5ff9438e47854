"""A cheap lower bound of a matrix's spectral norm, for Lipschitz tracking."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar


def spectral_norm_lower_bound(M: Float[Array, "n n"], iters: int = 10) -> Scalar:
    """Estimate `||M||_2` from below by power iteration.

    The start vector is the row of `M` with the largest energy (for a PSD matrix it
    already leans toward the top eigenvector), so no random draw is needed and the
    estimate is deterministic. The vector is renormalised every step, so `M` itself is
    never copied or rescaled; products accumulate in float32 whatever `M`'s dtype.

    **Arguments:**

    - `M`: a square matrix (symmetric PSD or skew-symmetric in practice).
    - `iters`: power-iteration steps.

    **Returns:**

    A float32 scalar `b` with `b <= ||M||_2` (up to rounding); 0 for `M = 0`.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    energy = jnp.sum(jnp.square(M.astype(jnp.float32)), axis=1)
    x = M[jnp.argmax(energy)].astype(jnp.float32)

    def times_M(x: Array) -> Array:
        x = x / jnp.maximum(jnp.max(jnp.abs(x)), tiny)
        return jnp.matmul(x.astype(M.dtype), M, preferred_element_type=jnp.float32)

    x = jax.lax.fori_loop(0, iters, lambda _, x: times_M(x), x)
    x = x / jnp.maximum(jnp.linalg.norm(x), tiny)
    return jnp.linalg.norm(jnp.matmul(x.astype(M.dtype), M, preferred_element_type=jnp.float32))
