"""ONE_D_PATH: vectors, scalars and any leaf whose merged shape is 1-D.

Each layer gets one diagonal factor `q` (`[length]`) and one Lipschitz estimate:
`Pg = q^2 (g + noise)`, `A = Pg^2`, `c = 1`, `L <- max(0.95 L + 0.05 l, l)` with
`l = max(A) + 1`, then the rule's diagonal step and the output `q'^2 g`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._config import Config
from .._layout import LeafPlan
from .._noise import NoiseSource
from .._rules import track_lipschitz
from .._state import LeafState
from ._factors import StepContext


def init(plan: LeafPlan, config: Config) -> LeafState:
    """`q = preconditioner_init_scale * 1` and `L = 0` for each layer."""
    (length,) = plan.merged
    dtype = config.compute_dtype
    return LeafState(
        kind=int(plan.kind),
        scanned=int(plan.scanned),
        B=plan.batch,
        shape=plan.shape,
        merged=plan.merged,
        nr=1,
        nc=1,
        block_size=plan.block_size,
        diag_left=True,
        diag_right=False,
        stack=plan.batch,
        Ql=jnp.full((plan.batch, length), config.preconditioner_init_scale, dtype),
        Ll=jnp.zeros(plan.batch, jnp.float32),
        valid_rows=jnp.full(plan.batch, length, jnp.int32),
        valid_cols=jnp.ones(plan.batch, jnp.int32),
    )


def update_all(
    ctx: StepContext,
    inputs: dict[int, Float[Array, "_ _"]],
    noise: NoiseSource | None,
    states: dict[int, LeafState],
    refresh: bool,
) -> tuple[dict[int, Float[Array, "_ _"]], dict[int, LeafState]]:
    """Precondition every 1-D leaf at once; update the factors too when `refresh`.

    All 1-D leaves (every layer of a scanned one is its own segment with its own
    Lipschitz estimate) are concatenated into one vector, so the whole kind is one
    fused computation however many leaves there are.

    **Arguments:**

    - `inputs`: leaf index -> the leaf viewed as `[B, n]` (non-empty leaves only).
    - `noise`: where the factor update's noise comes from (`None`: no noise).
    - `states`: leaf index -> its `LeafState`.

    **Returns:**

    `(outputs, new states)`, keyed like `inputs`.
    """
    order = sorted(inputs)
    if not order:
        return {}, {}
    lengths = [inputs[i].shape[1] for i in order for _ in range(inputs[i].shape[0])]
    segment = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    flat = lambda xs: jnp.concatenate([xs[i].reshape(-1) for i in order])
    x = flat(inputs)
    q = flat({i: states[i].Ql for i in order})
    if refresh:
        L = jnp.concatenate([states[i].Ll for i in order])  # pyright: ignore
        xn = x if noise is None else noise.add(x)
        Pg = q * q * xn
        A = Pg * Pg
        ell = jax.ops.segment_max(A.astype(jnp.float32), segment, len(lengths)) + 1
        L = track_lipschitz(L, ell)
        z = jnp.where(L > 0, ctx.rule.step_scale * ctx.lr / jnp.where(L > 0, L, 1), 0)
        q = ctx.rule.diag(q, A, jnp.ones((), q.dtype), z[segment].astype(q.dtype))
    out = q * q * x
    outputs, new_states = {}, {}
    offset, layer = 0, 0
    for i in order:
        batch, length = inputs[i].shape
        size = batch * length
        outputs[i] = out[offset : offset + size].reshape(batch, length)
        if refresh:
            new_states[i] = states[i].replace(
                Ql=q[offset : offset + size].reshape(batch, length),
                Ll=L[layer : layer + batch],  # pyright: ignore
            )
        else:
            new_states[i] = states[i]
        offset, layer = offset + size, layer + batch
    return outputs, new_states
