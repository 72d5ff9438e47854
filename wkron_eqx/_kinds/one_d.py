"""ONE_D_PATH: vectors, scalars and any leaf whose merged shape is 1-D.

Each layer gets one diagonal factor `q` (`[length]`) and one Lipschitz estimate:
`Pg = q^2 (g + noise)`, `A = Pg^2`, `c = 1`, `L <- max(0.95 L + 0.05 l, l)` with
`l = max(A) + 1`, then the rule's diagonal step and the output `q'^2 g`.

All 1-D leaves are one concatenated computation (see `update`).
"""

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._blocking import materialised, take
from .._config import Config
from .._custom_types import AxisNames
from .._kron import StepContext, initial_scales, powers, step_size, store
from .._layout import LeafKind, LeafPlan, OneDLayout, TreePlan
from .._noise import ONE_D_STREAM, add_noise
from .._norms import track_lipschitz
from .._state import LeafState
from ._base import AbstractLeafKind


State = tuple[LeafState, ...]  # one per 1-D leaf, in leaf order


def _init_leaf(plan: LeafPlan[OneDLayout], config: Config) -> LeafState:
    (length,) = plan.merged
    return LeafState.from_plan(
        plan,
        Ql=jnp.full((plan.batch, length), config.initial_scale, config.compute_dtype),
        Ll=jnp.zeros(plan.batch, jnp.float32),
        valid_rows=jnp.full(plan.batch, length, jnp.int32),
        valid_cols=jnp.ones(plan.batch, jnp.int32),
    )


class OneDKind(AbstractLeafKind):
    """`ONE_D_PATH`: a `LeafState` per 1-D leaf (`WhiteKronState.one_d`); all of them
    are stepped as one concatenated vector."""

    name: ClassVar[str] = "one_d"
    kind: ClassVar[LeafKind] = OneDLayout.kind
    layout: ClassVar[type] = OneDLayout
    caches: ClassVar[bool] = False  # `q^2 g` is one elementwise pass either way
    stacked: ClassVar[bool] = False  # small: replicated

    def positions(self, plan: TreePlan) -> dict[int, tuple[int, ...]]:
        # Each non-empty 1-D leaf's first element in the concatenation of all of them,
        # and its first layer among their layers.
        out, element, layer = {}, 0, 0
        for i in plan.of_kind(self.kind):
            leaf = plan.leaves[i]
            if size := leaf.batch * math.prod(leaf.merged):
                out[i] = (element, layer)
                element, layer = element + size, layer + leaf.batch
        return out

    def real_entries(self, plan: LeafPlan[OneDLayout]) -> int:
        return plan.layout.stack

    def init(self, plan: TreePlan, config: Config) -> State:
        """`q = preconditioner_init_scale * 1` and `L = 0` for each layer of each leaf."""
        return tuple(_init_leaf(plan.leaves[i], config) for i in plan.of_kind(self.kind))

    def init_cache(self, part: State, config: Config, symmetric: bool) -> None:
        """Nothing: a 1-D leaf stores no sides (see `update`)."""
        del part, config, symmetric

    def update(
        self,
        ctx: StepContext,
        inputs: dict[int, Float[Array, "B n"]],
        part: State,
        cache: None,
        slots: dict[int, Int[Array, " 3"]],
        plan: TreePlan,
        refresh: bool,
        axis_name: AxisNames,
    ) -> tuple[dict[int, Float[Array, "B n"]], State, Float[Array, " leaves"], None]:
        """Precondition every 1-D leaf at once; update the factors too when `refresh`.
        A 1-D leaf stores no sides (`cache` is `None`): its `q^2 g` is one elementwise
        pass with or without them.

        All 1-D leaves are concatenated into one vector, every layer of a scanned leaf its
        own segment with its own Lipschitz estimate, so the kind is a few kernels however
        many leaves there are. (Leaf by leaf gives fewer instructions but more kernels, and
        XLA's compile time follows the kernels.)
        """
        del axis_name, cache  # 1-D factors are small and stay replicated
        leaves = len(plan.leaves)
        if not inputs:
            return {}, part, jnp.zeros(leaves, jnp.float32), None
        state = self.by_leaf(part, plan)
        order = sorted(inputs)
        lengths = [inputs[i].shape[1] for i in order for _ in range(inputs[i].shape[0])]
        segment = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        owner = np.repeat(np.array(order, np.int32), [inputs[i].size for i in order])
        flat = lambda xs: jnp.concatenate([x.reshape(-1) for x in xs])
        x = flat([inputs[i] for i in order])
        x = ctx.corrected(x)
        q = flat([state[i].Ql for i in order])
        storage = q.dtype
        if ctx.stochastic_rounding:
            # The factor maths in float32, rounded to storage stochastically at the end; the
            # output in float32 on every step, so that a step that only applies the factors
            # gives what one that updates them does (the two are the branches of a `cond`).
            q, x = q.astype(jnp.float32), x.astype(jnp.float32)
        L = jnp.concatenate([state[i].Ll for i in order])  # pyright: ignore
        if refresh:
            if ctx.first is not None:
                # Each layer's factor from its first input (`initial_scales`).
                sums = jax.ops.segment_sum(powers(x), segment, len(lengths))
                size = np.maximum(np.array(lengths), 1)
                q = q * initial_scales(sums, size, ctx.first, factors=1)[segment].astype(q.dtype)
            Pg = q * q * materialised(add_noise(x, ctx.step, ctx.noise_scale))
            A = Pg * Pg
            peak = jax.ops.segment_max(A.astype(jnp.float32), segment, len(lengths))
            L = materialised(track_lipschitz(L, peak + 1))
            z = step_size(ctx.rule, L, ctx.lr)  # as a matrix factor's (`_kron._move`)
            q = materialised(ctx.rule.diag(q, A, jnp.ones((), q.dtype), z[segment].astype(q.dtype)))
        # Written once, so that each leaf's kernels only cut out their part (else XLA
        # copies the whole elementwise chain into every leaf's output and state kernels).
        out = materialised(q * q * x)
        if refresh and ctx.stochastic_rounding:
            q = materialised(store(ctx, q, storage, stream=ONE_D_STREAM))
        sum_sq = jax.ops.segment_sum(jnp.square(out.astype(jnp.float32)), owner, leaves)
        outputs = {}
        for i in order:
            # Runtime offsets (see `_kinds.leaf_slots`): leaves of one shape share kernels.
            _, offset, layer = slots[i]
            batch, length = inputs[i].shape
            outputs[i] = take(out, offset, batch * length).reshape(batch, length)
            if refresh:
                state[i] = state[i].replace(
                    Ql=take(q, offset, batch * length).reshape(batch, length),
                    Ll=take(L, layer, batch),
                )
        return outputs, self.in_order(state, plan), sum_sq, None
