"""QUAD: the quadratic-form factor update of PSGD-Kron."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from ._base import AbstractRule


class Quad(AbstractRule):
    """Dense: `P = Q - z(AQ - cQ)`, `P <- P - z(PA - cP)`, `Q <- (P + P^T)/2`.
    Diagonal: `q <- q (1 - z(A - c))^2`, with `z = lr / (2L)`."""

    step_scale: ClassVar[float] = 0.5
    # `(P + P^T) / 2` is symmetric bit for bit: float addition commutes.
    symmetric: ClassVar[bool] = True

    def dense(
        self, Q: Float[Array, "n n"], A: Float[Array, "n n"], c: Scalar, z: Scalar
    ) -> Float[Array, "n n"]:
        # P = Q - z(AQ - cQ) = MQ and P - z(PA - cP) = PM with M = (1 + zc) I - z A.
        M = (1 + z * c) * jnp.eye(A.shape[0], dtype=A.dtype) - z * A
        P = M @ Q @ M
        return (P + P.T) / 2

    def diag(
        self,
        q: Float[Array, "*shape"],
        A: Float[Array, "*shape"],
        c: Float[Array, "*#shape"],
        z: Float[Array, "*#shape"],
    ) -> Float[Array, "*shape"]:
        return q * jnp.square(1 - z * (A - c))
