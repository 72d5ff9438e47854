"""`scale_by_white_kron`: momentum -> per-kind preconditioning -> RMS clip -> lr style.

One step is straight-line code. With `preconditioner_update_probability=1` it holds no
`while`, `scan` or `cond` (each a host round trip on an accelerator); with a lower
probability, exactly one `cond` chooses between updating and only applying the factors.
A step whose result is not finite is undone by selects, not by a conditional.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from jaxtyping import Array, ArrayLike

from . import _damping as damp, _kron as kron
from ._backend import Backend
from ._blocking import leaf_unview, leaf_view, take
from ._checks import check_params, check_updates, scanned_flags
from ._config import Config
from ._custom_types import AxisNames, Unchecked
from ._kinds import KINDS, leaf_slots, state_specs
from ._kron import StepContext
from ._layout import LeafPlan, ShardGrid, TreePlan, plan_tree
from ._noise import MOMENTUM_STREAM, stochastic_round
from ._rules import AbstractRule
from ._sharding import (
    active_stack_axis,
    constrain_like,
    constrain_stack,
    leaf_specs,
    shard_grids,
    specs_tree,
    type_spec,
    with_auto_axes,
)
from ._state import Plan, PreconditionerCache, WhiteKronState


_CLIP_RMS = 1.1
_ADAM_STYLE_DIVISOR = 5.0
# The factor step size decays as `lr / sqrt(1 + t / _LR_DECAY_STEPS)` down to
# `min(lr, _LR_FLOOR)`; every `_BALANCE_EVERY` steps each pair of factors is rebalanced.
_LR_DECAY_STEPS = 10000
_LR_FLOOR = 0.4
_BALANCE_EVERY = 100


def _step_specs(config: Config, plan: Plan) -> list[PartitionSpec | None]:
    """Each leaf's `params_partition_specs` entry, else the sharding of a leaf planned by
    shard (from its `ShardGrid`), else `None`: what the step constrains each leaf's
    gradient, momentum and update to."""
    placeholders = plan.treedef.unflatten([0] * len(plan.tree.leaves))
    given = leaf_specs(placeholders, config.params_partition_specs)
    return [
        PartitionSpec(*leaf.grid.spec) if s is None and leaf.grid is not None else s
        for s, leaf in zip(given, plan.tree.leaves, strict=True)
    ]


def rms_clip_scale(sum_sq: Array, size: ArrayLike) -> Array:
    """`1.1 / max(rms, 1.1)` for leaves of `size` (>= 1) elements whose squares sum to
    `sum_sq` (elementwise over arrays of leaves)."""
    rms = jnp.sqrt(sum_sq / jnp.asarray(size, jnp.float32))
    return _CLIP_RMS / jnp.maximum(rms, _CLIP_RMS)


def _input_rms(inputs: list[Array], input_scale: Array) -> Array:
    """Per leaf, the float32 RMS of its (bias-corrected) input; 0 for an empty leaf."""
    sizes = np.array([max(x.size, 1) for x in inputs], np.float32)
    sum_sq = jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in inputs])
    return jnp.sqrt(sum_sq / sizes) * input_scale


def _finite(sum_sqs: Array) -> Array:
    """Whether a step is sound: every leaf's sum of squared outputs is finite."""
    return jnp.all(jnp.isfinite(sum_sqs))


def _refresh_due(config: Config, t: Array, counter: Array) -> Array | bool:
    """Whether the factors update this step (deterministic counter scheme)."""
    prob = config.preconditioner_update_probability
    if not callable(prob) and prob == 1.0:
        return True
    p = jnp.asarray(prob(t) if callable(prob) else prob, jnp.float32)
    return (counter + 1).astype(jnp.float32) >= 1.0 / p


def _precondition(
    ctx: StepContext,
    views: list[Array],
    state: WhiteKronState,
    plan: TreePlan,
    refresh: bool,
    axis_name: AxisNames,
) -> tuple[list[Array], Array, dict[str, Any], PreconditionerCache | None]:
    """Every non-empty leaf through its kind; returns the outputs (as views), each
    leaf's sum of squared outputs, and each kind's new part of the state (by field
    name) and the new cache."""
    outputs = list(views)
    sum_sq = jnp.zeros(len(views), jnp.float32)
    parts, caches = {}, {}
    for kind in KINDS:
        indices = [i for i in plan.of_kind(kind.kind) if views[i].size]
        cache = None if state.cache is None or not kind.caches else getattr(state.cache, kind.name)
        out, parts[kind.name], kind_sum_sq, cache = kind.update(
            ctx,
            {i: views[i] for i in indices},
            getattr(state, kind.name),
            cache,
            {i: state.slots[i] for i in indices},
            plan,
            refresh,
            axis_name,
        )
        parts[kind.name] = kind.constrained(parts[kind.name], plan, axis_name)
        if kind.caches:
            caches[kind.name] = None if cache is None else kind.constrained(cache, plan, axis_name)
        sum_sq = sum_sq + kind_sum_sq
        for i, x in out.items():
            outputs[i] = x
    cache = None if state.cache is None else PreconditionerCache(**caches)
    return outputs, sum_sq, parts, cache


def _view(x: Array, leaf: LeafPlan) -> Array:
    """A leaf's input as its kind sees it (`leaf_view`), a sharded leaf's shards along
    the leading axis, sharded over their mesh axes."""
    view = leaf_view(x, leaf)
    return view if leaf.grid is None else constrain_stack(view, leaf.grid.axes)


def _moment(
    config: Config,
    grads: list[Array],
    state: WhiteKronState,
    t: Array,
    t_float: Array,
    specs: list[PartitionSpec | None],
) -> tuple[Any, list[Array], Array]:
    """The momentum stage: the new moment to store (a tree like the params, or `None`
    with `b1 = 0`), the kinds' inputs and the scale that bias-corrects them.

    The input is the bias-corrected moment, `new_mu / (1 - b1^t)`: the kinds apply the
    correction to their stacked inputs (`kron.bias_corrected`). Both keep each leaf's
    sharding, `specs` (`_step_specs`)."""
    dtype = config.compute_dtype
    input_scale = jnp.ones((), jnp.float32)
    if config.b1 == 0:
        return None, [constrain_like(g.astype(dtype), s) for g, s in zip(grads, specs)], input_scale
    # In float32, stored in `dtype`.
    f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
    old_mu, mu_def = jax.tree.flatten(state.mu)
    grads32, mu32 = f32(grads), f32(old_mu)
    # (`optax.tree.update_moment`'s `b1 mu + (1 - b1) g`, without its `g ** 1`: one
    # traced operation fewer per leaf.)
    b1 = config.b1
    new_mu = [b1 * m + (1 - b1) * g for g, m in zip(grads32, mu32, strict=True)]
    if config.stochastic_rounding:
        # Stream: the leaf's index (as data, so same-shaped leaves share kernels).
        stored = [
            stochastic_round(m, dtype, t, (slot[0] + MOMENTUM_STREAM).astype(jnp.uint32))
            for m, slot in zip(new_mu, state.slots, strict=True)
        ]
    else:
        stored = [m.astype(dtype) for m in new_mu]
    new_mu = [constrain_like(m, s) for m, s in zip(stored, specs, strict=True)]
    # The same moment, written as `mu + (1 - b1)(g - mu)`: as a second expression, each
    # copy is fused into its one consumer (the kinds' stacking here, the state's select
    # at the end), where one shared value would be its own kernel per leaf shape, written
    # out and read back twice. (The two may differ in the last bit.)
    inputs = [
        constrain_like((m + (1 - b1) * (g - m)).astype(dtype), s)
        for g, m, s in zip(grads32, mu32, specs, strict=True)
    ]
    input_scale = optax.tree.bias_correction(input_scale, b1, t_float)
    return mu_def.unflatten(new_mu), inputs, input_scale


def _normalised(inputs: list[Array], input_scale: Array) -> tuple[list[Array], Array]:
    """`normalize_grads`: each leaf's input divided by its norm (plus `1e-6`); the bias
    correction is undone by the normalisation (but for its `1e-6`), so applied first."""
    inputs = [kron.bias_corrected(x, input_scale) if x.size else x for x in inputs]
    inputs = [
        x / (jnp.linalg.norm(x.astype(jnp.float32)) + 1e-6).astype(x.dtype) if x.size else x
        for x in inputs
    ]
    return inputs, jnp.ones((), jnp.float32)


def _damped(
    config: Config, inputs: list[Array], input_scale: Array, memory: Array | None
) -> tuple[Array | None, Array | None]:
    """`damping`: the new memory (each leaf's peak input RMS) and each leaf's factor of
    its update; `(memory, None)` without damping."""
    if config.damping == 0 or not inputs:
        return memory, None
    assert memory is not None
    input_rms = _input_rms(inputs, input_scale)
    memory = damp.remember(memory, input_rms)
    return memory, damp.step_scales(input_rms, memory, config.damping)


def _context(
    rule: AbstractRule,
    config: Config,
    platform: Backend,
    t: Array,
    t_float: Array,
    input_scale: Array,
) -> StepContext:
    """What every kind's step knows beyond its inputs: the rule (for the backend), the
    factors' step size this step, the balance and first-step flags, the dtypes."""
    lr = config.preconditioner_lr
    first = (t == 1) if config.preconditioner_init_scale is None else None
    lr = jnp.maximum(lr * jax.lax.rsqrt(1 + t_float / _LR_DECAY_STEPS), min(lr, _LR_FLOOR))
    if first is not None:
        lr = jnp.where(first, 0.0, lr)  # the factors take no step on the first one
    return StepContext(
        rule=rule.for_backend(platform),
        lr=lr,
        balance=(t % _BALANCE_EVERY) == 0,
        product_dtype=platform.product_dtype(config.compute_dtype, config.matmul_dtype),
        input_scale=input_scale,
        step=t,
        noise_scale=config.noise_scale,
        first=first,
        stochastic_rounding=config.stochastic_rounding,
        loops_are_cheap=platform.loops_are_cheap,
    )


class _Factors(NamedTuple):
    """The factor-holding parts of a state: each kind's part (by its field's name) and
    the stored sides."""

    parts: dict[str, Any]
    cache: PreconditionerCache | None

    @classmethod
    def of(cls, state: WhiteKronState) -> "_Factors":
        return cls({kind.name: getattr(state, kind.name) for kind in KINDS}, state.cache)


def _preconditioned(
    ctx: StepContext, config: Config, views: list[Array], state: WhiteKronState
) -> tuple[list[Array], Array, _Factors, _Factors, Array | bool]:
    """The preconditioning stage: every leaf through its kind, the factors updated when
    due (`preconditioner_update_probability`). `views`: each leaf's input as `[B, m,
    n]` (`[B, n]` for a 1-D leaf).

    **Returns:**

    `(outputs, sum_sqs, factors, kept, refreshed)`: the outputs (as views); each leaf's
    sum of squared outputs; the new factors; those a skipped step keeps (the old ones,
    or, when the update is a branch, the new ones already guarded inside it); and
    whether the factors were updated (`True` when every step updates them)."""
    plan = state.plan.tree
    axis = config.pipeline_axis_name
    refresh = _refresh_due(config, ctx.step, state.update_counter)
    if ctx.first is not None and refresh is not True:
        refresh = refresh | ctx.first  # the factors start from the first input
    old = _Factors.of(state)
    if refresh is True:
        outputs, sum_sqs, parts, cache = _precondition(ctx, views, state, plan, True, axis)
        return outputs, sum_sqs, _Factors(parts, cache), old, True

    def guarded_update():
        # The non-finite guard (`_kept_if_sound`) for the factors, inside the branch that
        # changes them: outside, the select would need the old factors alive beside the
        # branch's result, and XLA would copy every factor through the branch that only
        # applies them.
        outputs, sum_sqs, *new = _precondition(ctx, views, state, plan, True, axis)
        ok = _finite(sum_sqs)
        kept = jax.tree.map(lambda a, b: jax.lax.select(ok, a, b), tuple(new), tuple(old))
        return outputs, sum_sqs, *kept

    outputs, sum_sqs, parts, cache = jax.lax.cond(
        refresh, guarded_update, lambda: _precondition(ctx, views, state, plan, False, axis)
    )
    new = _Factors(parts, cache)
    return outputs, sum_sqs, new, new, refresh


def _clipped(
    config: Config,
    outputs: list[Array],
    grads: list[Array],
    sum_sqs: Array,
    damped: Array | None,
    state: WhiteKronState,
    specs: list[PartitionSpec | None],
) -> tuple[list[Array], Array]:
    """The RMS clip and `lr_style` stage: each leaf's output scaled, in its gradient's
    shape and dtype, or zero if the step is not sound; and whether it is.

    A non-finite gradient reaches every output it touches (through the matmuls, or
    through a NaN/Inf factor: a non-finite statistic makes the new factor NaN), so the
    outputs' sums of squares, which the RMS clip needs anyway, tell whether the step is
    sound: one reduction over them gives the verdict."""
    if not outputs:
        return [], jnp.array(True)
    ok = _finite(sum_sqs)
    # Every leaf's clip factor in one vectorised computation, not one per leaf.
    sizes = np.array([max(out.size, 1) for out in outputs], np.float32)
    divisor = _ADAM_STYLE_DIVISOR if config.lr_style == "adam" else 1.0
    scales = rms_clip_scale(sum_sqs, sizes) / divisor
    if damped is not None:
        scales = scales * damped
    updates = []
    plan = state.plan.tree
    for out, g, slot, leaf, spec in zip(
        outputs, grads, state.slots, plan.leaves, specs, strict=True
    ):
        # The leaf's index as data (see `leaf_slots`): same-shaped leaves share one kernel.
        scale = take(scales, slot[0], 1)[0]
        u = jax.lax.select(ok, out * scale.astype(out.dtype), jnp.zeros_like(out))
        updates.append(constrain_like(leaf_unview(u, leaf).astype(g.dtype), spec))
    return updates, ok


def _kept_if_sound(
    ok: Array, stepped: WhiteKronState, state: WhiteKronState, kept: _Factors
) -> WhiteKronState:
    """The guard: `stepped` if the step is sound, else `state` with the skip counted and
    reported, and the factors `kept` (`_preconditioned`)."""
    skipped = state._replace(
        skipped_steps=state.skipped_steps + 1,
        **kept.parts,
        cache=kept.cache,
        last_step_skipped=jnp.ones([], bool),
    )
    # (`lax.select` rather than `jnp.where`: no broadcasting to trace, per array.)
    keep = lambda new, old: new if new is old else jax.lax.select(ok, new, old)
    return jax.tree.map(keep, stepped, skipped)


def plan_params(
    params: Unchecked,
    config: Config,
    backend: Backend | None = None,
    grids: tuple[ShardGrid | None, ...] | None = None,
):
    """Check `params` and plan their layout, as `init` does (and `tree_plan`).

    `grids`: how each leaf is sharded, when read before `params` were traced
    (`param_grids`); else read from `params` here.

    **Returns:**

    `(plan, leaves, treedef, names, backend)`: the `TreePlan`; the params' leaves,
    tree structure and `keystr` paths (`check_params`); the `Backend` planned for
    (`backend`, else that of `jax.default_backend()`).
    """
    active_stack_axis(config.pipeline_axis_name, config.pipeline_axis_size)  # checks
    leaves, treedef, names = check_params(params)
    platform = Backend.of() if backend is None else backend
    if grids is None:
        grids = param_grids(params, config)
    plan = plan_tree(
        tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves),
        scanned_flags(config.scanned_layers, params),
        config.block_size,
        config.max_size_dense,
        config.pipeline_axis_size,
        platform.grouping,
        config.memory_save_mode,
        grids,
    )
    return plan, leaves, treedef, names, platform


def param_grids(params: Unchecked, config: Config) -> tuple[ShardGrid | None, ...]:
    """How each leaf of `params` is sharded, for the shard-local layout (`shard_grids`);
    all `None` with `follow_shards=False`."""
    leaves, _, names = check_params(params)
    if not config.follow_shards:
        return (None,) * len(leaves)
    return shard_grids(
        leaves,
        names,
        leaf_specs(params, config.params_partition_specs),
        config.pipeline_axis_name,
        config.mesh_axis_sizes,
    )


def scale_by_white_kron(
    rule: AbstractRule, config: Config, backend: Backend | None = None
) -> optax.GradientTransformation:
    """The preconditioning transform for a given factor-update `rule`.

    **Arguments:**

    - `rule`: `Quad()` or `Procrustes()` (or any `AbstractRule`).
    - `config`: the validated hyperparameters.
    - `backend`: the platform choices the step is traced with (`Backend`); `None`:
      those of `jax.default_backend()` when `init` runs. `init` stores them in the
      state's plan, and `update` follows them.

    **Returns:**

    An `optax.GradientTransformation` whose state is a `WhiteKronState`.
    """
    dtype = config.compute_dtype

    def init_fn(params: Unchecked, grids: tuple[ShardGrid | None, ...]) -> WhiteKronState:
        plan, leaves, treedef, names, platform = plan_params(params, config, backend, grids)
        # Each kind's part, and its stored sides, sharded as the step keeps them.
        axis = config.pipeline_axis_name
        parts = {kind.name: kind.constrained(kind.init(plan, config), plan, axis) for kind in KINDS}
        cache = None
        if config.caches:
            sides = {
                kind.name: kind.constrained(
                    kind.init_cache(parts[kind.name], config, rule.symmetric), plan, axis
                )
                for kind in KINDS
                if kind.caches
            }
            cache = PreconditionerCache(**sides)
        mu = None
        if config.b1 > 0:
            specs = _step_specs(config, Plan(plan, names, treedef, platform))
            mu = treedef.unflatten(
                [
                    constrain_like(jnp.zeros(jnp.shape(x), dtype), s)
                    for x, s in zip(leaves, specs, strict=True)
                ]
            )
        # A fresh buffer for each counter: a state whose leaves share a buffer cannot be
        # donated ("Attempt to donate the same buffer twice").
        zero = lambda: jnp.zeros([], jnp.int32)
        return WhiteKronState(
            count=zero(),
            mu=mu,
            **parts,
            update_counter=zero(),
            skipped_steps=zero(),
            factor_updates=zero(),
            slots=tuple(jnp.array(s, jnp.int32) for s in leaf_slots(plan)),
            plan=Plan(plan, names, treedef, platform),
            cache=cache,
            damping_memory=jnp.zeros(len(leaves), jnp.float32) if config.damping > 0 else None,
            last_step_skipped=jnp.zeros([], bool),
        )

    def update_fn(updates: Unchecked, state: WhiteKronState, params: Unchecked = None):
        del params
        grads, treedef = check_updates(updates, state)
        t = jnp.asarray(optax.safe_increment(state.count))
        t_float = t.astype(jnp.float32)
        # Each leaf's sharding, which its input, momentum and update keep.
        specs = _step_specs(config, state.plan)
        mu, inputs, input_scale = _moment(config, grads, state, t, t_float, specs)
        if config.normalize_grads:
            inputs, input_scale = _normalised(inputs, input_scale)
        views = [_view(x, leaf) for x, leaf in zip(inputs, state.plan.tree.leaves, strict=True)]
        memory, damped = _damped(config, inputs, input_scale, state.damping_memory)
        ctx = _context(rule, config, state.plan.backend, t, t_float, input_scale)
        outputs, sum_sqs, factors, kept, refreshed = _preconditioned(ctx, config, views, state)
        if refreshed is True:
            counter, refreshed = state.update_counter, jnp.ones([], jnp.int32)
        else:
            counter = jnp.where(refreshed, 0, state.update_counter + 1)
            refreshed = jnp.asarray(refreshed, jnp.int32)
        new_updates, ok = _clipped(config, outputs, grads, sum_sqs, damped, state, specs)
        stepped = WhiteKronState(
            count=t,
            mu=mu,
            **factors.parts,
            update_counter=counter.astype(jnp.int32),
            skipped_steps=state.skipped_steps,
            factor_updates=state.factor_updates + refreshed,
            slots=state.slots,
            plan=state.plan,
            cache=factors.cache,
            damping_memory=memory,
            last_step_skipped=jnp.zeros([], bool),
        )
        return treedef.unflatten(new_updates), _kept_if_sound(ok, stepped, state, kept)

    def mesh_axis() -> AxisNames:
        return active_stack_axis(config.pipeline_axis_name, config.pipeline_axis_size)

    def mu_specs(params: Unchecked) -> Any:
        return specs_tree(params, config.params_partition_specs, type_spec)

    # Under a mesh with Explicit axes (`jax.make_mesh`'s default) the step runs with them
    # Auto, and its results come out with the shardings in their types: the stacks over
    # the pipeline axis, the momentum and the updates like the params and gradients.
    def init_specs(state: WhiteKronState, params: Unchecked) -> WhiteKronState:
        return state_specs(state, mesh_axis(), mu_specs(params))

    def update_specs(out, updates: Unchecked, state: WhiteKronState, params: Unchecked = None):
        del params
        new_updates, new_state = out
        mu = None if state.mu is None else jax.tree.map(type_spec, state.mu)
        return jax.tree.map(type_spec, updates), state_specs(new_state, mesh_axis(), mu)

    # Compiled as one program even when called eagerly (un-jitted, every operation would
    # be dispatched and compiled on its own: seconds for a small tree); inside a user's
    # jitted step it is traced inline like any other function.
    def init(params: Unchecked) -> Any:
        # The shardings are read before the Explicit axes turn Auto (`with_auto_axes`).
        grids = param_grids(params, config)
        return with_auto_axes(lambda p: init_fn(p, grids), init_specs)(params)

    return optax.GradientTransformation(
        init,
        eqx.filter_jit(with_auto_axes(update_fn, update_specs)),  # pyright: ignore
    )
