"""`Backend`: what the step does differently per platform, decided once, at `init`.

The choices are facts about how XLA compiles for a platform, not about the tree: how
dense tiles are batched, whether the power iteration may run as a loop, and whether
narrow (bfloat16) matrix multiplies run natively. `init` makes the record (for
`jax.default_backend()`, unless one is given) and stores it in the state's plan; the
step reads it from there and asks nothing else.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ._layout import ACCELERATOR_GROUPING, CPU_GROUPING, Grouping


class Backend(eqx.Module):
    """The platform choices of one step.

    **Fields:**

    - `platform`: the JAX platform name they were made for (`"cpu"`, `"gpu"`, `"tpu"`).
    - `grouping`: how dense buckets merge into compute groups. A CPU pays for every
      FLOP of zero padding, an accelerator for every kernel launch.
    - `loops_are_cheap`: whether the power iteration of the spectral-norm bound may run
      as a loop. On the CPU a `while` costs nothing at run time and compiles its body
      once (unrolled, each step is code to compile: `tests/test_step_structure.py`
      counts 12 launching instructions as a loop against 30 unrolled); on an
      accelerator each iteration is a round trip to the host, so there it is unrolled.
    - `narrow_matmuls`: whether matrix multiplies in a dtype narrower than float32 run
      natively. XLA's CPU backend has none: it runs each in float32 and rounds back,
      a conversion pass per product (and its compile time) that loses precision for
      nothing.

    `Backend.of(platform)` gives the record JAX's platforms get; pass another one to
    `scale_by_white_kron` to trace the step as it would be for another platform (a
    structure test, or `jax.export` for an accelerator from a CPU host).
    """

    platform: str
    grouping: Grouping
    loops_are_cheap: bool
    narrow_matmuls: bool

    @classmethod
    def of(cls, platform: str | None = None) -> "Backend":
        """The record for a platform name; `None`: `jax.default_backend()`."""
        platform = jax.default_backend() if platform is None else platform
        cpu = platform == "cpu"
        return cls(
            platform=platform,
            grouping=CPU_GROUPING if cpu else ACCELERATOR_GROUPING,
            loops_are_cheap=cpu,
            narrow_matmuls=not cpu,
        )

    def product_dtype(self, storage: DTypeLike, matmul_dtype: DTypeLike | None) -> jnp.dtype:
        """The dtype the Kronecker products run in: `matmul_dtype` when given, else the
        storage dtype, widened to float32 where narrow matmuls are not native."""
        if matmul_dtype is not None:
            return jnp.dtype(matmul_dtype)
        storage = jnp.dtype(storage)
        if storage.itemsize < 4 and not self.narrow_matmuls:
            return jnp.dtype(jnp.float32)
        return storage
