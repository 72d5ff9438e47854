"""`damping`: let each leaf's step shrink once its input has fallen far below the largest
it has been.

The whitening makes `Pl G Pr` come out at about unit RMS whatever the size of `G`. That
is what carries PSGD across plateaus (the gradient is small there, the step is not), and
also why, at a constant learning rate, it stalls near an optimum where the gradient
vanishes: the step stays near `0.2 lr` while the parameters are already closer than that.

With `damping = d > 0` the state remembers, per leaf, the largest RMS `M` its input (the
bias-corrected momentum) has had, and the leaf's update is multiplied by
`min(1, r / (d M))`, `r` the input's RMS this step. While the input stays within a
factor `1 / d` of its past peak (on a plateau the gradient is small, but seldom 1e3
below its peak) nothing changes; near an optimum, where the gradient keeps falling, the
step becomes proportional to it, as a gradient step is, and the iterates converge
instead of hovering. The factors are left alone: the whitening keeps its shape, so an
ill-conditioned problem keeps its preconditioner.

(Damping the whitening itself, and remembering an average or the first step's RMS
instead of the peak, were measured against this on `benchmarks/precision.py`'s
problems and lost plateaus: `benchmarks/results/precision.md`.)
"""

import jax.numpy as jnp
from jaxtyping import Array, Float


def remember(memory: Float[Array, " n"], rms: Float[Array, " n"]) -> Float[Array, " n"]:
    """The memory (each leaf's peak input RMS) after a step whose inputs had these
    per-leaf `rms` (float32)."""
    return jnp.maximum(memory, rms)


def step_scales(
    rms: Float[Array, " n"], peak: Float[Array, " n"], damping: float
) -> Float[Array, " n"]:
    """`min(1, rms / (damping * peak))` per leaf; 1 where nothing is remembered."""
    floor = damping * peak
    return jnp.where(floor > 0, jnp.minimum(1.0, rms / jnp.where(floor > 0, floor, 1)), 1.0)
