from typing import TypeAlias

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree


Params: TypeAlias = PyTree[ArrayLike]
Updates: TypeAlias = PyTree[Array]
# What `init` / `update` are handed: any pytree. They check its leaves themselves, so
# that a leaf that is not a floating-point array gets an error naming it and the fix.
Unchecked: TypeAlias = PyTree

ALLOWED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# One mesh axis name, several (the stacks are then spread over all of them), or none.
AxisNames: TypeAlias = str | tuple[str, ...] | None
