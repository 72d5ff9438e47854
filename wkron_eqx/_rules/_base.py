"""The interface every factor-update rule implements."""

import abc

import equinox as eqx
from jaxtyping import Array, Float, Scalar

from .._backend import Backend


class AbstractRule(eqx.Module):
    """How one Kronecker factor moves, given its statistic `A` and constant `c`.

    A rule sees one factor at a time: a dense `Q` (`[n, n]`) or a diagonal `q`
    (`[n]`), the statistic `A` of the same shape, the constant `c` and the step
    `z`, already divided by the tracked Lipschitz constant. Shapes are per tile;
    the caller `vmap`s over the stack.
    """

    # `z = step_scale * lr / L`: QUAD takes half steps, Procrustes full ones.
    step_scale: eqx.AbstractClassVar[float]
    # Whether `dense` returns a bitwise-symmetric `Q` whenever it is given one (the
    # padded identity it starts from is). Then `Q^T Q` is computed as `Q Q`: no
    # transposed operand for the matmul to read.
    symmetric: eqx.AbstractClassVar[bool]

    def for_backend(self, backend: Backend) -> "AbstractRule":
        """This rule as a step traced for `backend` runs it: a rule whose maths has
        platform choices (a loop or an unrolled one) takes them from `backend`. By
        default, the rule itself."""
        del backend
        return self

    @abc.abstractmethod
    def dense(
        self, Q: Float[Array, "n n"], A: Float[Array, "n n"], c: Scalar, z: Scalar
    ) -> Float[Array, "n n"]:
        """Return the updated dense factor."""

    @abc.abstractmethod
    def diag(
        self,
        q: Float[Array, "*shape"],
        A: Float[Array, "*shape"],
        c: Float[Array, "*#shape"],
        z: Float[Array, "*#shape"],
    ) -> Float[Array, "*shape"]:
        """Return the updated diagonal factor."""
