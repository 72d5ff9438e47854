"""Procrustes ("skew"): a full factor step, then a rotation toward symmetry."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._backend import Backend
from .._norms import spectral_norm_lower_bound
from ._base import AbstractRule


# The rotation step is at most this divided by ||R||_2 (R the normalised skew part).
_MAX_ROTATION = 1 / 8


def procrustes_step(Q: Float[Array, "n n"], loop: bool | None = None) -> Float[Array, "n n"]:
    """One step of rotating `Q` toward a symmetric matrix.

    With `R = (Q^T - Q) / max|Q^T - Q|`, when `tr(RQ) > 0`, move by the rotation
    `Q + a (RQ + a/2 R^2 Q)` with `a = (1/8) / ||R||_2`, shortened to
    `-tr(RQ) / tr(R^2 Q)` when that is smaller and positive. A `Q` that is already
    symmetric (to within the dtype's smallest normal number) is returned unchanged.
    `loop` is the spectral-norm bound's (`spectral_norm_lower_bound`).
    """
    R = Q.T - Q
    size = jnp.max(jnp.abs(R))
    active = size > jnp.finfo(Q.dtype).tiny
    R = R / jnp.where(active, size, 1)
    RQ = R @ Q
    RRQ = R @ RQ
    tr_RQ, tr_RRQ = jnp.trace(RQ), jnp.trace(RRQ)
    norm = spectral_norm_lower_bound(R, loop=loop)
    a = (_MAX_ROTATION / jnp.where(norm > 0, norm, 1)).astype(Q.dtype)
    shortened = -tr_RQ / jnp.where(tr_RRQ < 0, tr_RRQ, -1)
    a = jnp.where(tr_RRQ < 0, jnp.minimum(a, shortened), a)
    rotated = Q + a * (RQ + 0.5 * a * RRQ)
    return jnp.where(active & (tr_RQ > 0) & (norm > 0), rotated, Q)


class Procrustes(AbstractRule):
    """Dense: `Q <- Q - z(AQ - cQ)`, then `procrustes_step`.
    Diagonal: `q <- q (1 - z(A - c))`, with `z = lr / L`.

    **Fields:**

    - `loops_are_cheap`: whether the rotation's spectral-norm bound runs its power
      iteration as a loop (`Backend.loops_are_cheap`); `None`: as `jax.default_backend()`
      does. The step sets it from its backend (`for_backend`).
    """

    step_scale: ClassVar[float] = 1.0
    symmetric: ClassVar[bool] = False
    loops_are_cheap: bool | None = eqx.field(default=None, static=True)

    def for_backend(self, backend: Backend) -> "Procrustes":
        return Procrustes(loops_are_cheap=backend.loops_are_cheap)

    def dense(
        self, Q: Float[Array, "n n"], A: Float[Array, "n n"], c: Scalar, z: Scalar
    ) -> Float[Array, "n n"]:
        # Q - z(AQ - cQ) = MQ with M = (1 + zc) I - z A.
        M = (1 + z * c) * jnp.eye(A.shape[0], dtype=A.dtype) - z * A
        return procrustes_step(M @ Q, self.loops_are_cheap)

    def diag(
        self,
        q: Float[Array, "*shape"],
        A: Float[Array, "*shape"],
        c: Float[Array, "*#shape"],
        z: Float[Array, "*#shape"],
    ) -> Float[Array, "*shape"]:
        return q * (1 - z * (A - c))
