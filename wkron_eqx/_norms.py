"""The estimates a factor step is normalised by: a spectral-norm lower bound and the
running Lipschitz constant."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from ._backend import Backend


# Power-iteration steps of the spectral-norm lower bound, unrolled.
POWER_ITERATIONS = 10


def track_lipschitz(L: Float[Array, "*s"], ell: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """`L <- max(0.95 L + 0.05 ell, ell)`: a running estimate that never lags a jump."""
    return jnp.maximum(0.95 * L + 0.05 * ell, ell)


def spectral_norm_lower_bound(
    M: Float[Array, "n n"], iters: int = POWER_ITERATIONS, loop: bool | None = None
) -> Scalar:
    """Estimate `||M||_2` from below by `iters` steps of power iteration, as a loop or
    unrolled.

    The start vector is the row of `M` with the largest energy (for a PSD matrix it
    already leans toward the top eigenvector), so no random draw is needed and the
    estimate is deterministic. Products accumulate in float32 whatever `M`'s dtype.

    **Arguments:**

    - `M`: a square matrix (symmetric PSD or skew-symmetric in practice).
    - `iters`: power-iteration steps.
    - `loop`: run them as a `fori_loop` (cheap on the CPU) rather than unrolled (on an
      accelerator each loop iteration is a round trip to the host): a
      `Backend.loops_are_cheap`. `None`: that of `jax.default_backend()`.

    **Returns:**

    A float32 scalar `b` with `b <= ||M||_2` (up to rounding); 0 for `M = 0`.
    """
    f32 = jnp.float32
    tiny = jnp.finfo(f32).tiny
    # The iteration is on M / ||M||_F (spectral norm in [1/sqrt(n), 1]): each step keeps
    # or shrinks the vector, by at most 1/sqrt(n), so no renormalisation is needed
    # between steps, nor of the start vector or the last iterate, since the bound is a
    # ratio of norms (each renormalisation a kernel of its own: on an accelerator a
    # launch, on the CPU code to compile). The scale is applied to the vector after
    # each product, never to M: a scaled copy of M would be one more stack-sized
    # temporary for XLA to hold (a matmul cannot fuse its operand's producer). Squares
    # are only taken of entries of M / max|M| (in [-1, 1]) and of vectors scaled into
    # float32's normal range (below), so no square overflows for a large M, and the
    # products stay finite for max|M| * n below float32's maximum.
    n = M.shape[0]
    peak = jnp.max(jnp.abs(M)).astype(f32)
    # (Below the smallest normal float32 a peak's inverse would overflow; such an M is
    # then iterated unscaled, its squares vanish, and the bound comes out 0.)
    inverse = 1 / jnp.where(peak >= tiny, peak, 1)
    energy = jnp.sum(jnp.square(M.astype(f32) * inverse), axis=1)
    step = jax.lax.rsqrt(jnp.maximum(jnp.sum(energy), tiny)) * inverse
    times = lambda x: jnp.matmul(x.astype(M.dtype), M, preferred_element_type=f32)
    x = M[jnp.argmax(energy)].astype(f32) * step
    if Backend.of().loops_are_cheap if loop is None else loop:
        x = jax.lax.fori_loop(0, iters, lambda _, x: times(x) * step, x)
    else:
        for _ in range(iters):
            x = times(x) * step
    # ||x M|| / ||x|| <= ||M||_2, as ||x (M / max|M|)|| / ||x|| * max|M|. The last
    # iterate's norm is in [n^(-(iters + 1)/2), 1], so both vectors are lifted by
    # n^((iters + 1)/4) (a constant, cancelled in the ratio) before their squares are
    # summed: the sums then stay in float32's normal range for any n <= 2^16.
    lift = float(n) ** ((iters + 1) / 4)
    top = jnp.linalg.norm(times(x) * (inverse * lift))
    return top / jnp.maximum(jnp.linalg.norm(x * lift), tiny) * peak
