"""ONE_D_PATH: vectors, scalars and any leaf whose merged shape is 1-D.

Each layer gets one diagonal factor `q` (`[length]`). The step is the left half of the
Kronecker step on the leaf viewed as a `[length, 1]` matrix: `Pg = q^2 (g + noise)`,
`A = Pg^2`, `c = 1`, output `q'^2 g`.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._config import Config
from .._layout import LeafPlan
from .._state import LeafState
from ._factors import apply_stack, Factors, StepContext, update_stack


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


def update(
    ctx: StepContext,
    x: Float[Array, "B n"],
    state: LeafState,
    plan: LeafPlan,
    refresh: bool,
    axis_name: str | None,
) -> tuple[Float[Array, "B n"], LeafState]:
    """Precondition a 1-D leaf; update its factor too when `refresh`."""
    del plan, axis_name
    assert state.Ql is not None and state.Ll is not None
    assert state.valid_rows is not None and state.valid_cols is not None
    column = x[:, :, None]
    factors = Factors(state.Ql, None, state.Ll, None)
    if refresh:
        out, factors = update_stack(ctx, column, factors, state.valid_rows, state.valid_cols)
        state = state.replace(Ql=factors.Ql, Ll=factors.Ll)
    else:
        out = apply_stack(column, factors)
    return out[:, :, 0], state
