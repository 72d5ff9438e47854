"""The optax transforms: momentum -> per-kind preconditioning -> RMS clip -> lr style."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec
from jaxtyping import Array

from ._config import Config
from ._custom_types import Params, Updates
from ._kinds import dense, large, one_d
from ._kinds._factors import StepContext
from ._layout import LeafKind, LeafPlan, TreePlan, plan_tree
from ._noise import NoiseSource
from ._rules import AbstractRule
from ._sharding import constrain_like
from ._state import DenseState, LeafState, WhiteKronState


_INIT = {
    LeafKind.DENSE: dense.init,
    LeafKind.LARGE: large.init,
    LeafKind.ONE_D: one_d.init,
}

_CLIP_RMS = 1.1
_ADAM_STYLE_DIVISOR = 5.0
_NOISE_SEED = 0x5EED


def _path_names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def scanned_flags(scanned_layers: Any, params: Params) -> tuple[bool, ...]:
    """Broadcast `scanned_layers` (None, a bool, a full tree or a prefix tree of bools)
    to one flag per leaf of `params`, refusing anything that does not fit."""
    leaves, treedef = jax.tree.flatten(params)
    if scanned_layers is None:
        return (False,) * len(leaves)
    try:
        broadcast = jax.tree.map(
            lambda flag, sub: jax.tree.map(lambda _: flag, sub),
            scanned_layers,
            params,
        )
        flags = treedef.flatten_up_to(broadcast)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`scanned_layers` must be None, a bool, or a tree of bools whose structure is "
            f"a prefix of the params tree; it does not match: {e}"
        ) from None
    names = _path_names(params)
    out = []
    for name, flag, leaf in zip(names, flags, leaves, strict=True):
        if not isinstance(flag, bool | int) and not (hasattr(flag, "shape") and flag.shape == ()):
            raise ValueError(f"`scanned_layers` at {name} must be a bool, got {flag!r}.")
        flag = bool(flag)
        if flag and jnp.ndim(leaf) == 0:
            raise ValueError(
                f"`scanned_layers` flags the leaf {name} as scanned, but it has no leading axis "
                "(shape ())."
            )
        out.append(flag)
    return tuple(out)


def _plan(config: Config, shapes, flags) -> TreePlan:
    return plan_tree(
        tuple(tuple(int(d) for d in s) for s in shapes),
        tuple(flags),
        config.block_size,
        config.max_size_dense,
        config.pipeline_axis_size,
    )


def _partition_specs(config: Config, params: Params) -> list[PartitionSpec | None]:
    leaves, treedef = jax.tree.flatten(params)
    specs = config.params_partition_specs
    if specs is None:
        return [None] * len(leaves)
    if isinstance(specs, PartitionSpec):
        return [specs] * len(leaves)
    try:
        return list(treedef.flatten_up_to(specs))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`params_partition_specs` must be a PartitionSpec or a tree of them matching "
            f"the params: {e}"
        ) from None


def _leaf_view(x: Array, plan: LeafPlan) -> Array:
    return x.reshape((plan.batch,) + plan.merged)


def _expected_shape(s: LeafState) -> tuple[int, ...]:
    return ((s.B,) if s.scanned else ()) + tuple(s.shape or ())


def _check_matches(updates: Updates, leaf_states: list[LeafState], names: list[str]):
    for name, g, s in zip(names, jax.tree.leaves(updates), leaf_states, strict=True):
        expected = _expected_shape(s)
        if tuple(g.shape) != expected:
            raise ValueError(
                f"The update at {name} has shape {tuple(g.shape)}, but the optimizer state "
                f"was initialised for shape {expected}."
            )
        if not jnp.issubdtype(g.dtype, jnp.inexact):
            raise TypeError(
                f"The update at {name} has dtype {g.dtype}; a floating dtype is required."
            )


def _structure_mismatch(updates: Updates, state_leaves: Any) -> ValueError:
    """An error naming the leaves that one tree has and the other lacks."""
    is_leaf_state = lambda x: isinstance(x, LeafState)
    flat_state = jax.tree_util.tree_flatten_with_path(state_leaves, is_leaf=is_leaf_state)[0]
    want = {jax.tree_util.keystr(p): _expected_shape(s) for p, s in flat_state}
    have = {
        jax.tree_util.keystr(p): tuple(jnp.shape(x))
        for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    details = []
    if missing := [f"{k} (shape {v})" for k, v in want.items() if k not in have]:
        details.append("it lacks " + ", ".join(missing))
    if extra := [f"{k} (shape {v})" for k, v in have.items() if k not in want]:
        details.append("the state has no leaf " + ", ".join(extra))
    if not details:  # the same paths in other containers (a tuple for a list, ...)
        state_def = jax.tree.structure(state_leaves, is_leaf=is_leaf_state)
        details.append(f"its containers {jax.tree.structure(updates)} are not {state_def}")
    return ValueError(
        "The updates tree does not have the structure of the params the optimizer state "
        f"was initialised with: {'; '.join(details)}."
    )


def _flatten_against_state(updates: Updates, state: WhiteKronState):
    leaves, treedef = jax.tree.flatten(updates)
    try:
        leaf_states = treedef.flatten_up_to(state.leaves)
    except (ValueError, TypeError):
        raise _structure_mismatch(updates, state.leaves) from None
    if not all(isinstance(s, LeafState) for s in leaf_states):
        raise _structure_mismatch(updates, state.leaves)
    names = _path_names(updates)
    _check_matches(updates, leaf_states, names)
    return leaves, treedef, leaf_states


def _rms_clip(u: Array) -> tuple[Array, Array]:
    """`u * 1.1 / max(rms(u), 1.1)` and whether `u` is finite (from the same reduction:
    a NaN/Inf anywhere makes the sum of squares non-finite)."""
    if u.size == 0:
        return u, jnp.array(True)
    sum_sq = jnp.sum(jnp.square(u.astype(jnp.float32)))
    rms = jnp.sqrt(sum_sq / u.size)
    return u * (_CLIP_RMS / jnp.maximum(rms, _CLIP_RMS)).astype(u.dtype), jnp.isfinite(sum_sq)


def _all_finite(arrays: list[Array]) -> Array:
    """One reduction over the concatenation (for small arrays such as the L's)."""
    arrays = [a.reshape(-1) for a in arrays if a.size]
    return jnp.all(jnp.isfinite(jnp.concatenate(arrays))) if arrays else jnp.array(True)


def _refresh_due(config: Config, t: Array, counter: Array) -> Array | bool:
    """Whether the factors update this step (deterministic counter scheme)."""
    prob = config.preconditioner_update_probability
    if not callable(prob) and prob == 1.0:
        return True
    p = jnp.asarray(prob(t) if callable(prob) else prob, jnp.float32)
    return (counter + 1).astype(jnp.float32) >= 1.0 / p


def _precondition_all(
    ctx: StepContext,
    views: list[Array],
    noise: NoiseSource | None,
    dense_states: tuple[DenseState, ...],
    leaf_states: list[LeafState],
    plan: TreePlan,
    refresh: bool,
    axis_name: str | None,
):
    """Dispatch every non-empty leaf to its kind; return outputs and new factor states.

    Dense leaves go through the shared tile buckets, 1-D leaves through one fused
    computation, large leaves one by one (each has its own stack of strips).
    """
    outputs, leaf_states = list(views), list(leaf_states)
    by_kind: dict[LeafKind, list[int]] = {kind: [] for kind in LeafKind}
    for i, p in enumerate(plan.leaves):
        if views[i].size:  # zero-size leaves pass through unchanged
            by_kind[p.kind].append(i)
    pick = lambda kind: {i: views[i] for i in by_kind[kind]}

    dense_out, dense_states = dense.update_buckets(
        ctx, pick(LeafKind.DENSE), noise, dense_states, plan, refresh, axis_name
    )
    one_d_out, one_d_states = one_d.update_all(
        ctx,
        pick(LeafKind.ONE_D),
        noise,
        {i: leaf_states[i] for i in by_kind[LeafKind.ONE_D]},
        refresh,
    )
    for i, out in {**dense_out, **one_d_out}.items():
        outputs[i] = out
    for i, s in one_d_states.items():
        leaf_states[i] = s
    for i in by_kind[LeafKind.LARGE]:
        outputs[i], leaf_states[i] = large.update(
            ctx, views[i], noise, leaf_states[i], plan.leaves[i], refresh, axis_name
        )
    return outputs, dense_states, leaf_states


def scale_by_white_kron(rule: AbstractRule, config: Config) -> optax.GradientTransformation:
    """The preconditioning transform for a given factor-update `rule`.

    **Arguments:**

    - `rule`: `Quad()` or `Procrustes()` (or any `AbstractRule`).
    - `config`: the validated hyperparameters.

    **Returns:**

    An `optax.GradientTransformation` whose state is a `WhiteKronState`.
    """
    dtype = config.compute_dtype

    def init_fn(params: Params) -> WhiteKronState:
        leaves, treedef = jax.tree.flatten(params)
        flags = scanned_flags(config.scanned_layers, params)
        plan = _plan(config, [jnp.shape(x) for x in leaves], flags)
        leaf_states = [_INIT[p.kind](p, config) for p in plan.leaves]
        if config.b1 > 0:
            specs = _partition_specs(config, params)
            mu = treedef.unflatten(
                [
                    constrain_like(jnp.zeros(jnp.shape(x), dtype), s)
                    for x, s in zip(leaves, specs, strict=True)
                ]
            )
        else:
            mu = None
        return WhiteKronState(
            count=jnp.zeros([], jnp.int32),
            mu=mu,
            dense=dense.init_buckets(plan, config),
            leaves=treedef.unflatten(leaf_states),
            update_counter=jnp.zeros([], jnp.int32),
            skipped_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates: Updates, state: WhiteKronState, params: Params | None = None):
        del params
        grads, treedef, leaf_states = _flatten_against_state(updates, state)
        plan = _plan(
            config,
            [g.shape for g in grads],
            [bool(s.scanned) for s in leaf_states],
        )
        t = state.count + 1
        t_float = t.astype(jnp.float32)

        if config.b1 > 0:
            old_mu = treedef.flatten_up_to(state.mu)
            b1 = config.b1
            new_mu = [
                (b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32)).astype(dtype)
                for m, g in zip(old_mu, grads, strict=True)
            ]
            specs = _partition_specs(config, updates)
            new_mu = [constrain_like(m, s) for m, s in zip(new_mu, specs, strict=True)]
            correction = 1 - jnp.asarray(b1, jnp.float32) ** t_float
            inputs = [(m.astype(jnp.float32) / correction).astype(dtype) for m in new_mu]
        else:
            new_mu = None
            inputs = [g.astype(dtype) for g in grads]
        if config.normalize_grads:
            inputs = [
                x / (jnp.linalg.norm(x.astype(jnp.float32)) + 1e-6).astype(dtype) if x.size else x
                for x in inputs
            ]
        views = [_leaf_view(x, p) for x, p in zip(inputs, plan.leaves, strict=True)]

        lr = config.preconditioner_lr
        ctx = StepContext(
            rule=rule,
            lr=jnp.maximum(lr * jax.lax.rsqrt(1 + t_float / 10000), min(lr, 0.4)),
            balance=(t % 100) == 0,
            product_dtype=config.product_dtype,
        )
        axis = config.pipeline_axis_name

        def step(refresh: bool):
            def run():
                noise = None
                if refresh and config.noise_scale > 0 and plan.stacked_elements:
                    noise = NoiseSource(t, _NOISE_SEED, config.noise_scale, plan.stacked_elements)
                return _precondition_all(
                    ctx, views, noise, state.dense, leaf_states, plan, refresh, axis
                )

            return run

        refresh = _refresh_due(config, t, state.update_counter)
        if refresh is True:
            outputs, dense_states, new_leaf_states = step(True)()
            counter = state.update_counter
        else:
            outputs, dense_states, new_leaf_states = jax.lax.cond(refresh, step(True), step(False))
            counter = jnp.where(refresh, 0, state.update_counter + 1)

        # A non-finite gradient reaches every output it touches (through the matmuls, or
        # through a NaN/Inf factor), so checking the outputs and the L's catches both bad
        # gradients and overflow in the maths, without another pass over the gradients.
        new_updates, finite = [], []
        for out, g in zip(outputs, grads, strict=True):
            u, u_finite = _rms_clip(out.reshape(g.shape))
            if config.lr_style == "adam":
                u = u / jnp.asarray(_ADAM_STYLE_DIVISOR, u.dtype)
            new_updates.append(u.astype(g.dtype))
            finite.append(u_finite)

        lipschitz = [d.Ll for d in dense_states] + [d.Lr for d in dense_states]
        lipschitz += [s.Ll for s in new_leaf_states if s.Ll is not None]
        lipschitz += [s.Lr for s in new_leaf_states if s.Lr is not None]
        ok = jnp.all(jnp.stack(finite)) & _all_finite(lipschitz) if finite else jnp.array(True)

        stepped = WhiteKronState(
            count=t,
            mu=None if new_mu is None else treedef.unflatten(new_mu),
            dense=dense_states,
            leaves=treedef.unflatten(new_leaf_states),
            update_counter=counter.astype(jnp.int32),
            skipped_steps=state.skipped_steps,
        )
        skipped = state._replace(skipped_steps=state.skipped_steps + 1)
        # One conditional picks the whole state: no per-array select kernels.
        new_state = jax.lax.cond(ok, lambda: stepped, lambda: skipped)
        new_updates = [jnp.where(ok, u, jnp.zeros_like(u)) for u in new_updates]
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore
