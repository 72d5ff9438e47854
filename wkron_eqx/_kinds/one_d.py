"""ONE_D_PATH: vectors, scalars and any leaf whose merged shape is 1-D.

Each layer gets one diagonal factor `q` (`[length]`) and one Lipschitz estimate:
`Pg = q^2 (g + noise)`, `A = Pg^2`, `c = 1`, `L <- max(0.95 L + 0.05 l, l)` with
`l = max(A) + 1`, then the rule's diagonal step and the output `q'^2 g`.

Each leaf is its own small computation (see `update`).
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._config import Config
from .._kron import StepContext
from .._layout import LeafKind, LeafPlan, TreePlan
from .._noise import add_noise
from .._norms import track_lipschitz
from .._state import LeafState


KIND = LeafKind.ONE_D
State = dict[int, LeafState]


def _init_leaf(plan: LeafPlan, config: Config) -> LeafState:
    (length,) = plan.merged
    return LeafState.from_plan(
        plan,
        Ql=jnp.full((plan.batch, length), config.preconditioner_init_scale, config.compute_dtype),
        Ll=jnp.zeros(plan.batch, jnp.float32),
        valid_rows=jnp.full(plan.batch, length, jnp.int32),
        valid_cols=jnp.ones(plan.batch, jnp.int32),
    )


def init(plan: TreePlan, config: Config) -> State:
    """`q = preconditioner_init_scale * 1` and `L = 0` for each layer of each leaf."""
    return {i: _init_leaf(plan.leaves[i], config) for i in plan.of_kind(KIND)}


def _update_leaf(
    ctx: StepContext, x: Float[Array, "B n"], state: LeafState, refresh: bool
) -> tuple[Float[Array, "B n"], LeafState]:
    q, L = state.Ql, state.Ll
    assert q is not None and L is not None
    if refresh:
        Pg = q * q * add_noise(x, ctx.step, ctx.noise_scale)
        A = Pg * Pg
        L = track_lipschitz(L, jnp.max(A.astype(jnp.float32), axis=1) + 1)
        z = jnp.where(L > 0, ctx.rule.step_scale * ctx.lr / jnp.where(L > 0, L, 1), 0)
        q = ctx.rule.diag(q, A, jnp.ones((), q.dtype), z[:, None].astype(q.dtype))
        state = state.replace(Ql=q, Ll=L)
    return q * q * x, state


def update(
    ctx: StepContext,
    inputs: dict[int, Float[Array, "B n"]],
    state: State,
    plan: TreePlan,
    refresh: bool,
    axis_name: str | None,
) -> tuple[dict[int, Float[Array, "B n"]], State]:
    """Precondition every 1-D leaf; update the factors too when `refresh`. Keys as
    `dense.update`.

    Each leaf is its own small elementwise computation over its `[B, length]` view.
    Concatenating them into one vector looks cheaper, but cutting the results back
    out at each leaf's offset makes XLA copy the whole computation (noise included)
    into every per-leaf slice: more code to compile than leaf-by-leaf.
    """
    del plan, axis_name  # 1-D factors are small and stay replicated
    outputs, new_state = {}, {}
    for i, x in inputs.items():
        outputs[i], new_state[i] = _update_leaf(ctx, x, state[i], refresh)
    return outputs, new_state
