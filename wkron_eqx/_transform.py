"""`scale_by_white_kron`: momentum -> per-kind preconditioning -> RMS clip -> lr style.

One step is straight-line code. With `preconditioner_update_probability=1` it holds no
`while`, `scan` or `cond` (each a host round trip on an accelerator); with a lower
probability, exactly one `cond` chooses between updating and only applying the factors.
A step whose result is not finite is undone by selects, not by a conditional.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from jaxtyping import Array, ArrayLike

from . import _damping as damp, _kron as kron
from ._backend import Backend
from ._blocking import take
from ._checks import check_params, check_updates, unwrapped
from ._config import Config
from ._custom_types import AxisNames, Unchecked
from ._kinds import KINDS, StateParts, leaf_slots, state_specs
from ._kron import StepContext
from ._layout import TreePlan, plan_tree
from ._noise import MOMENTUM_STREAM, stochastic_round
from ._rules import AbstractRule
from ._sharding import (
    active_stack_axis,
    constrain_like,
    leaf_specs,
    specs_tree,
    type_spec,
    with_auto_axes,
)
from ._state import LeafState, Plan, PreconditionerCache, WhiteKronState


_CLIP_RMS = 1.1
_ADAM_STYLE_DIVISOR = 5.0
# The factor step size decays as `lr / sqrt(1 + t / _LR_DECAY_STEPS)` down to
# `min(lr, _LR_FLOOR)`; every `_BALANCE_EVERY` steps each pair of factors is rebalanced.
_LR_DECAY_STEPS = 10000
_LR_FLOOR = 0.4
_BALANCE_EVERY = 100


def _key_name(key: Any) -> Any:
    """A path entry as a plain name: a dict key, an attribute or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _plain_path(path: tuple) -> tuple:
    return tuple(_key_name(k) for k in unwrapped(path))


_NNX_RECIPE = (
    "With Flax NNX, a nested dict keyed like the model's attributes works, e.g. "
    '`{"blocks": True, "head": False}`; so does a tree of the params\' own type: '
    "`flags = jax.tree.map(lambda _: False, nnx.state(model, nnx.Param))`, then set "
    '`flags["blocks"] = jax.tree.map(lambda _: True, flags["blocks"])`.'
)


def _flags_by_path(scanned_layers: Any, params: Unchecked) -> list[Any]:
    """Broadcast a prefix tree of another container type (a plain dict against a Flax
    NNX `State`, or against an Equinox module's attributes) by matching key paths."""
    prefix = {_plain_path(p): f for p, f in jax.tree_util.tree_flatten_with_path(scanned_layers)[0]}
    used, flags = set(), []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _plain_path(path)
        owner = next((names[:n] for n in range(len(names), -1, -1) if names[:n] in prefix), None)
        if owner is None:
            raise ValueError(
                "`scanned_layers` must be None, a bool, or a (prefix) tree of bools covering "
                f"every params leaf; nothing in it covers {jax.tree_util.keystr(unwrapped(path))}"
                ". " + _NNX_RECIPE
            )
        used.add(owner)
        flags.append(prefix[owner])
    if unused := [p for p in prefix if p not in used]:
        unused = ", ".join("".join(f"[{k!r}]" for k in p) for p in unused)
        raise ValueError(
            f"`scanned_layers` has entries that name no params leaf: {unused}. " + _NNX_RECIPE
        )
    return flags


def scanned_flags(scanned_layers: Any, params: Unchecked) -> tuple[bool, ...]:
    """Broadcast `scanned_layers` (None, a bool, a full tree or a prefix tree of bools)
    to one flag per leaf of `params`, refusing anything that does not fit.

    A prefix tree of the params' own structure is broadcast as `jax.tree.broadcast`
    does; one of other containers (a nested dict against a Flax NNX `State` or an
    Equinox module) is matched by key path. A flag is a Python `bool` or a NumPy
    `np.bool_`; an int or a JAX array is refused (it is too easy to pass a traced or
    non-boolean value by mistake).
    """
    leaves = jax.tree.leaves(params)
    if scanned_layers is None:
        return (False,) * len(leaves)
    try:
        flags = jax.tree.leaves(jax.tree.broadcast(scanned_layers, params))
    except (ValueError, TypeError):
        # Not JAX's wording (it names its internals): ours names the leaf and the fix.
        flags = _flags_by_path(scanned_layers, params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if len(flags) != len(leaves):
        raise ValueError(
            "`scanned_layers` must be a bool or a tree of bools whose structure is a prefix "
            f"of the params tree; it broadcasts to {len(flags)} flags for {len(leaves)} leaves."
        )
    out = []
    for name, flag, leaf in zip(names, flags, leaves, strict=True):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(
                f"`scanned_layers` at {name} must be a bool (`True`/`False`), got {flag!r}."
            )
        if flag and jnp.ndim(leaf) == 0:
            raise ValueError(
                f"`scanned_layers` flags the leaf {name} as scanned, but it has no leading axis "
                "(shape ())."
            )
        out.append(bool(flag))
    return tuple(out)


def _partition_specs(config: Config, params: Unchecked) -> list[PartitionSpec | None]:
    return leaf_specs(params, config.params_partition_specs)


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
) -> tuple[list[Array], Array, tuple, tuple[LeafState, ...], PreconditionerCache | None]:
    """Every non-empty leaf through its kind; returns the outputs (as views), each
    leaf's sum of squared outputs, and the new dense buckets, leaf states and cache."""
    outputs = list(views)
    parts = _parts(state)
    sum_sq = jnp.zeros(len(views), jnp.float32)
    for kind in KINDS:
        indices = [i for i in plan.of_kind(kind.kind) if views[i].size]
        kind_state, kind_cache = kind.get(parts, indices)
        out, kind_state, kind_sum_sq, kind_cache = kind.update(
            ctx,
            {i: views[i] for i in indices},
            kind_state,
            kind_cache,
            {i: state.slots[i] for i in indices},
            plan,
            refresh,
            axis_name,
        )
        parts = kind.put(parts, kind_state, kind_cache)
        sum_sq = sum_sq + kind_sum_sq
        for i, x in out.items():
            outputs[i] = x
    return outputs, sum_sq, parts.dense, parts.leaves, _cache(parts)


def _parts(state: WhiteKronState) -> StateParts:
    cache = state.cache
    return StateParts(
        dense=state.dense,
        leaves=state.leaves,
        dense_cache=None if cache is None else cache.dense,
        leaf_cache=None if cache is None else cache.leaves,
    )


def _cache(parts: StateParts) -> PreconditionerCache | None:
    if parts.dense_cache is None or parts.leaf_cache is None:
        return None
    return PreconditionerCache(dense=parts.dense_cache, leaves=parts.leaf_cache)


def plan_params(params: Unchecked, config: Config, backend: Backend | None = None):
    """Check `params` and plan their layout, as `init` does (and `tree_plan`).

    **Returns:**

    `(plan, leaves, treedef, names, backend)`: the `TreePlan`; the params' leaves,
    tree structure and `keystr` paths (`check_params`); the `Backend` planned for
    (`backend`, else that of `jax.default_backend()`).
    """
    active_stack_axis(config.pipeline_axis_name, config.pipeline_axis_size)  # checks
    leaves, treedef, names = check_params(params)
    platform = Backend.of() if backend is None else backend
    plan = plan_tree(
        tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves),
        scanned_flags(config.scanned_layers, params),
        config.block_size,
        config.max_size_dense,
        config.pipeline_axis_size,
        platform.grouping,
        config.memory_save_mode,
    )
    return plan, leaves, treedef, names, platform


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

    def init_fn(params: Unchecked) -> WhiteKronState:
        plan, leaves, treedef, names, platform = plan_params(params, config, backend)
        caches = config.caches
        parts = StateParts(
            dense=(),
            # (the kinds with factors of their own replace theirs)
            leaves=tuple(LeafState.from_plan(p) for p in plan.leaves),
            dense_cache=() if caches else None,
            leaf_cache=(None,) * len(plan.leaves) if caches else None,
        )
        for kind in KINDS:
            kind_state = kind.init(plan, config)
            kind_cache = kind.init_cache(kind_state, config, rule.symmetric) if caches else None
            parts = kind.put(parts, kind_state, kind_cache)
        mu = None
        if config.b1 > 0:
            specs = _partition_specs(config, params)
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
            dense=parts.dense,
            leaves=parts.leaves,
            update_counter=zero(),
            skipped_steps=zero(),
            factor_updates=zero(),
            slots=tuple(jnp.array(s, jnp.int32) for s in leaf_slots(plan)),
            plan=Plan(plan, names, treedef, platform),
            cache=_cache(parts),
            damping_memory=jnp.zeros(len(leaves), jnp.float32) if config.damping > 0 else None,
        )

    def update_fn(updates: Unchecked, state: WhiteKronState, params: Unchecked = None):
        del params
        grads, treedef = check_updates(updates, state)
        plan, platform = state.plan.tree, state.plan.backend
        t = jnp.asarray(optax.safe_increment(state.count))
        t_float = t.astype(jnp.float32)

        # The input is the bias-corrected moment, `new_mu / (1 - b1^t)`: the kinds apply
        # the correction to their stacked inputs (`kron.bias_corrected`).
        input_scale = jnp.ones((), jnp.float32)
        if config.b1 > 0:
            # In float32, stored in `dtype`.
            f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
            old_mu, mu_def = jax.tree.flatten(state.mu)
            grads32, mu32 = f32(grads), f32(old_mu)
            # (`optax.tree.update_moment`'s `b1 mu + (1 - b1) g`, without its `g ** 1`:
            # one traced operation fewer per leaf.)
            b1 = config.b1
            new_mu = [b1 * m + (1 - b1) * g for g, m in zip(grads32, mu32, strict=True)]
            specs = _partition_specs(config, updates)
            if config.stochastic_rounding:
                # Stream: the leaf's index (as data, so same-shaped leaves share kernels).
                stored = [
                    stochastic_round(m, dtype, t, (slot[0] + MOMENTUM_STREAM).astype(jnp.uint32))
                    for m, slot in zip(new_mu, state.slots, strict=True)
                ]
            else:
                stored = [m.astype(dtype) for m in new_mu]
            new_mu = [constrain_like(m, s) for m, s in zip(stored, specs, strict=True)]
            # The same moment, written as `mu + (1 - b1)(g - mu)`: as a second
            # expression, each copy is fused into its one consumer (the kinds' stacking
            # here, the state's select below), where one shared value would be its own
            # kernel per leaf shape, written out and read back twice. (The two may
            # differ in the last bit.)
            inputs = [
                constrain_like((m + (1 - b1) * (g - m)).astype(dtype), s)
                for g, m, s in zip(grads32, mu32, specs, strict=True)
            ]
            input_scale = optax.tree.bias_correction(input_scale, config.b1, t_float)
        else:
            mu_def, new_mu = None, None
            inputs = [g.astype(dtype) for g in grads]
        if config.normalize_grads:
            # Per leaf, and the scale is undone by the normalisation (but for its 1e-6).
            inputs = [kron.bias_corrected(x, input_scale) if x.size else x for x in inputs]
            inputs = [
                x / (jnp.linalg.norm(x.astype(jnp.float32)) + 1e-6).astype(dtype) if x.size else x
                for x in inputs
            ]
            input_scale = jnp.ones((), jnp.float32)
        views = [x.reshape((p.batch,) + p.merged) for x, p in zip(inputs, plan.leaves, strict=True)]

        # `damping`: per leaf, a factor of the output
        memory, damped = state.damping_memory, None
        if config.damping > 0 and inputs:
            assert memory is not None
            input_rms = _input_rms(inputs, input_scale)
            memory = damp.remember(memory, input_rms)
            damped = damp.step_scales(input_rms, memory, config.damping)

        lr = config.preconditioner_lr
        first = (t == 1) if config.preconditioner_init_scale is None else None
        lr = jnp.maximum(lr * jax.lax.rsqrt(1 + t_float / _LR_DECAY_STEPS), min(lr, _LR_FLOOR))
        if first is not None:
            lr = jnp.where(first, 0.0, lr)  # the factors take no step on the first one
        ctx = StepContext(
            rule=rule.for_backend(platform),
            lr=lr,
            balance=(t % _BALANCE_EVERY) == 0,
            product_dtype=platform.product_dtype(dtype, config.matmul_dtype),
            input_scale=input_scale,
            step=t,
            noise_scale=config.noise_scale,
            first=first,
            stochastic_rounding=config.stochastic_rounding,
            loops_are_cheap=platform.loops_are_cheap,
        )
        axis = config.pipeline_axis_name

        refresh = _refresh_due(config, t, state.update_counter)
        if ctx.first is not None and refresh is not True:
            refresh = refresh | ctx.first  # the factors start from the first input
        factors = (state.dense, state.leaves, state.cache)
        if refresh is True:
            outputs, sum_sqs, buckets, leaf_states, cache = _precondition(
                ctx, views, state, plan, True, axis
            )
            counter, refreshed = state.update_counter, jnp.ones([], jnp.int32)
        else:

            def guarded_update():
                # The non-finite guard (below) for the factors, inside the branch that
                # changes them: outside, the select would need the old factors alive
                # beside the branch's result, and XLA would copy every factor through
                # the branch that only applies them.
                outputs, sum_sqs, *new = _precondition(ctx, views, state, plan, True, axis)
                ok = _finite(sum_sqs)
                kept = jax.tree.map(lambda a, b: jax.lax.select(ok, a, b), tuple(new), factors)
                return outputs, sum_sqs, *kept

            outputs, sum_sqs, buckets, leaf_states, cache = jax.lax.cond(
                refresh,
                guarded_update,
                lambda: _precondition(ctx, views, state, plan, False, axis),
            )
            factors = (buckets, leaf_states, cache)  # already guarded
            counter = jnp.where(refresh, 0, state.update_counter + 1)
            refreshed = jnp.asarray(refresh, jnp.int32)

        # A non-finite gradient reaches every output it touches (through the matmuls, or
        # through a NaN/Inf factor: a non-finite statistic makes the new factor NaN), so
        # the outputs' sums of squares, which the RMS clip needs anyway, tell whether the
        # step is sound. One reduction over them gives the verdict.
        new_updates = []
        if outputs:
            ok = _finite(sum_sqs)
            # Every leaf's clip factor in one vectorised computation, not one per leaf.
            sizes = np.array([max(out.size, 1) for out in outputs], np.float32)
            divisor = _ADAM_STYLE_DIVISOR if config.lr_style == "adam" else 1.0
            scales = rms_clip_scale(sum_sqs, sizes) / divisor
            if damped is not None:
                scales = scales * damped
            for out, g, slot in zip(outputs, grads, state.slots, strict=True):
                # The leaf's index as data (see `leaf_slots`): same-shaped leaves share
                # one kernel.
                scale = take(scales, slot[0], 1)[0]
                u = jax.lax.select(ok, out * scale.astype(out.dtype), jnp.zeros_like(out))
                new_updates.append(u.reshape(g.shape).astype(g.dtype))
        else:
            ok = jnp.array(True)

        stepped = WhiteKronState(
            count=t,
            mu=None if mu_def is None else mu_def.unflatten(new_mu),
            dense=buckets,
            leaves=leaf_states,
            update_counter=counter.astype(jnp.int32),
            skipped_steps=state.skipped_steps,
            factor_updates=state.factor_updates + refreshed,
            slots=state.slots,
            plan=state.plan,
            cache=cache,
            damping_memory=memory,
        )
        skipped = state._replace(
            skipped_steps=state.skipped_steps + 1,
            dense=factors[0],
            leaves=factors[1],
            cache=factors[2],
        )
        # (`lax.select` rather than `jnp.where`: no broadcasting to trace, per array.)
        keep = lambda new, old: new if new is old else jax.lax.select(ok, new, old)
        new_state = jax.tree.map(keep, stepped, skipped)
        return treedef.unflatten(new_updates), new_state

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
    return optax.GradientTransformation(
        with_auto_axes(init_fn, init_specs),
        eqx.filter_jit(with_auto_axes(update_fn, update_specs)),  # pyright: ignore
    )
