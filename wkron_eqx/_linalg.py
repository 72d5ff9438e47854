"""Matrix products in the factors' dtype, accumulated in float32."""

import jax.numpy as jnp
from jaxtyping import Array


def mm(a: Array, b: Array) -> Array:
    """`a @ b`, accumulated in float32 and rounded once to the operands' dtype.

    For float32 this is a plain matmul. For bfloat16 the result is the float32 product
    rounded to bfloat16, more accurate than bfloat16 accumulation, and on CPU twice as
    fast (XLA's bfloat16 matmul converts and accumulates element by element).
    """
    dtype = jnp.result_type(a, b)
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)
