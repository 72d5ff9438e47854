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

`MECHANISM` and `MEMORY` choose among the alternatives `benchmarks/precision.py`
measured (it sets them): the step scaling above, or a damping of the whitening itself
(`P ~ (E[G G^T] + s^2 I)^(-1/2)`, with `s = d` times the remembered RMS of the whole
tree, added to the factors' input as noise); remembering the peak, an exponential
average (`b2 = 0.999`, bias-corrected), or the first step's RMS.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Scalar


MECHANISM = "step"  # or "whitening"
MEMORY = "peak"  # or "average", "first"
AVERAGE_DECAY = 0.999


def remember(
    memory: Float[Array, " n"], rms: Float[Array, " n"], t: Int[Array, ""]
) -> Float[Array, " n"]:
    """The memory after a step whose inputs had these per-leaf `rms` (float32). For
    the average it is the raw (not bias-corrected) average of the mean squares."""
    if MEMORY == "peak":
        return jnp.maximum(memory, rms)
    if MEMORY == "first":
        return jnp.where(t == 1, rms, memory)
    return AVERAGE_DECAY * memory + (1 - AVERAGE_DECAY) * jnp.square(rms)


def remembered_rms(memory: Float[Array, " n"], t: Int[Array, ""]) -> Float[Array, " n"]:
    """The per-leaf RMS the damping is relative to."""
    if MEMORY == "average":
        correction = 1 - AVERAGE_DECAY ** t.astype(jnp.float32)
        return jnp.sqrt(memory / correction)
    return memory


def step_scales(
    rms: Float[Array, " n"], reference: Float[Array, " n"], damping: float
) -> Float[Array, " n"]:
    """`min(1, rms / (damping * reference))` per leaf; 1 where nothing is remembered."""
    floor = damping * reference
    return jnp.where(floor > 0, jnp.minimum(1.0, rms / jnp.where(floor > 0, floor, 1)), 1.0)


def whitening_scale(reference: Float[Array, " n"], sizes: np.ndarray, damping: float) -> Scalar:
    """`damping` times the tree's remembered RMS (each leaf weighted by its size)."""
    weights = jnp.asarray(sizes / max(float(np.sum(sizes)), 1.0), jnp.float32)
    return damping * jnp.sqrt(jnp.sum(weights * jnp.square(reference)))
