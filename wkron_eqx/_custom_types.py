from typing import TypeAlias

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree


Params: TypeAlias = PyTree[ArrayLike]
Updates: TypeAlias = PyTree[Array]

ALLOWED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
