"""The public factories: `scale_by_quad`, `scale_by_skew` and the `quad`, `skew` aliases.

Each builds one `Config`, which checks the arguments, and hands it to `scale_by_white_kron`;
`quad` / `skew` chain the weight decay and the learning rate after it. `tree_plan` plans a
tree from the same arguments.
"""

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PyTree

from ._config import (
    STATIC_ARGS as STATIC_ARGS,
    BoolScalar,
    Config,
    IntScalar,
    RealScalar,
    check_learning_rate,
    check_weight_decay,
    python_scalar,
)
from ._custom_types import Params, Unchecked
from ._layout import TreePlan
from ._rules import AbstractRule, Procrustes, Quad
from ._transform import plan_params, scale_by_white_kron


def _config(arguments: dict[str, Any]) -> Config:
    """The `Config` of a factory's arguments: `locals()` taken first thing in the
    factory, so exactly its parameters; those that are not `Config`'s (`learning_rate`,
    `weight_decay`, `weight_decay_mask`) are left for the chain."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in arguments.items() if k in fields})


def scale_by_quad(
    lr_style: str | None = "adam",
    b1: RealScalar = 0.95,
    normalize_grads: BoolScalar = False,
    max_size_dense: IntScalar = 16384,
    preconditioner_lr: RealScalar = 0.7,
    preconditioner_init_scale: RealScalar | None = 1.0,
    dtype: DTypeLike = jnp.bfloat16,
    scanned_layers: PyTree | None = None,
    block_size: IntScalar = 256,
    pipeline_axis_name: str | tuple[str, ...] | None = None,
    pipeline_axis_size: IntScalar = 1,
    params_partition_specs: PyTree[PartitionSpec] | None = None,
    noise_scale: RealScalar = 1e-9,
    preconditioner_update_probability: RealScalar | optax.Schedule = 1.0,
    matmul_dtype: DTypeLike | None = None,
    memory_save_mode: str | None = None,
    stochastic_rounding: BoolScalar = False,
    cache_preconditioner: BoolScalar = False,
    damping: RealScalar = 0.0,
    follow_shards: BoolScalar = True,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """Kronecker-factored preconditioning with the QUAD factor update.

    Momentum, then each leaf preconditioned by its Kronecker factors (updated this step),
    then the RMS of each leaf's update clipped to 1.1, then the `lr_style` scaling.

    **Arguments:**

    - `lr_style`: `"adam"` divides the (RMS-clipped) update by 5, bringing its RMS to
        at most 0.22 (AdamW's is at most 1); `None` leaves it as is. Adam's learning
        rates do not carry over one for one: see the learning-rate guide.
    - `b1`: momentum coefficient in `[0, 1)`; `0` preconditions the raw gradient.
    - `normalize_grads`: divide each leaf's input by its norm (plus `1e-6`) first.
    - `max_size_dense`: a side longer than this gets a diagonal factor (`LARGE_PATH`).
    - `preconditioner_lr`: factor step size; it decays as `lr / sqrt(1 + t/10000)`
        down to `min(lr, 0.4)`.
    - `preconditioner_init_scale`: initial factors are this times the identity. `None`:
        on the first step, each layer's factors are rescaled from its first input `G`
        so that `Pl G Pr` has about unit RMS (the product of the sides is scaled by
        `1 / RMS(G)`), and they take no step on that first step; a zero or non-finite
        first input leaves that layer's factors at 1.
    - `dtype`: storage dtype of the factors and momentum (`jnp.float32` or
        `jnp.bfloat16`); the maths runs in it, except the products (`matmul_dtype`).
    - `scanned_layers`: a bool or a (prefix) tree of bools; a flagged leaf's leading axis
        is a stack of independent layers, each preconditioned separately. `init` refuses
        a tree that does not fit the params, naming the leaf.
    - `block_size`: the largest side of a dense tile.
    - `pipeline_axis_name`: mesh axis (or tuple of axes) over which stacked factors
        are sharded.
    - `pipeline_axis_size`: stacks are padded with inert dummies to a multiple of this;
        under a mesh, a multiple of the size of `pipeline_axis_name` (the product of the
        sizes, for several axes).
    - `params_partition_specs`: a `PartitionSpec` or tree of them for the params; the
        momentum is constrained to it, and a sharded leaf is tiled shard by shard
        (`follow_shards`). Needed under Auto mesh axes; under Explicit ones the
        params' types give the same.
    - `noise_scale`: scale of the Gaussian noise added to the gradient for the factor
        update (never to the output).
    - `preconditioner_update_probability`: a float in `(0, 1]` or a schedule `step -> p`;
        the factors are updated once every `1/p` steps (deterministic counter), other
        steps only apply them. `1.0` updates every step.
    - `matmul_dtype`: the dtype the Kronecker products (and the factor updates of dense
        and strip factors) run in. `None`: `dtype`, except `jnp.float32` when `dtype` is
        bfloat16 on a CPU backend (which has no bfloat16 matmul). `jnp.bfloat16` rounds
        as the reference does.
    - `memory_save_mode`: `None` (a diagonal factor only for a side longer than
        `max_size_dense`), `"one_diag"` (also the longer side of every matrix leaf, the
        right one for a square leaf) or `"all_diag"` (every side). A diagonal side is
        one vector for the whole side; the other side is cut into strips of
        `block_size`, each with its own dense factor.
    - `stochastic_rounding`: when the factors and momentum are stored in bfloat16 but
        computed in float32 (`matmul_dtype`, or a CPU), round them to storage up or down
        at random, unbiased, so that updates smaller than half a bfloat16 ulp are not
        lost; the bits are a hash of the step counter (the same run twice draws the
        same bits). The 1-D leaves' factor maths then runs in float32 too. No effect
        with float32 storage.
    - `cache_preconditioner`: with an update probability below 1, also store each
        factor's side `P = Q^T Q` (`q^2` for a diagonal one) whenever the factors are
        updated, so that a step that only applies them computes `Pl G Pr` with one
        product per side instead of two. It costs one more array the size of each
        dense factor (and each diagonal one) in the state; 1-D leaves store none. With
        a constant probability of 1 nothing is stored (every step updates).
    - `damping`: `d > 0` multiplies each leaf's update by `min(1, r / (d M))`, with `r`
        the RMS of the leaf's input (the bias-corrected momentum) and `M` the largest it
        has been, so that the step shrinks with the gradient near an optimum instead
        of staying near `0.2 lr`; within a factor `1/d` of its peak nothing changes.
        `0.0` (the default) turns it off: the same program as without the option.
        See the options page for when to use it and the recommended value. It costs
        one float32 per leaf in the state; refused with `normalize_grads`.
    - `follow_shards`: with sharded params, tile each leaf's shards on their own, so
        that its factors live and work where its shard lives (see the multi-device
        guide): a leaf's sharding is read from its type under Explicit mesh axes, else
        from `params_partition_specs`. `False`: plan every leaf whole, as without a mesh.
    - `mesh_axis_sizes`: `{axis name: size}` of the mesh axes the params are sharded
        over, to plan the shard-local layout without a mesh in scope (to reproduce a
        sharded run on one device, from `params_partition_specs`); `None`: the sizes of
        the mesh in scope.

    **Returns:**

    An `optax.GradientTransformation`; its state is a `WhiteKronState`.
    """
    config = _config(locals())
    return scale_by_white_kron(Quad(), config)


def scale_by_skew(
    lr_style: str | None = "adam",
    b1: RealScalar = 0.95,
    normalize_grads: BoolScalar = False,
    max_size_dense: IntScalar = 16384,
    preconditioner_lr: RealScalar = 0.7,
    preconditioner_init_scale: RealScalar | None = 1.0,
    dtype: DTypeLike = jnp.bfloat16,
    scanned_layers: PyTree | None = None,
    block_size: IntScalar = 256,
    pipeline_axis_name: str | tuple[str, ...] | None = None,
    pipeline_axis_size: IntScalar = 1,
    params_partition_specs: PyTree[PartitionSpec] | None = None,
    noise_scale: RealScalar = 1e-9,
    preconditioner_update_probability: RealScalar | optax.Schedule = 1.0,
    matmul_dtype: DTypeLike | None = None,
    memory_save_mode: str | None = None,
    stochastic_rounding: BoolScalar = False,
    cache_preconditioner: BoolScalar = False,
    damping: RealScalar = 0.0,
    follow_shards: BoolScalar = True,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """Kronecker-factored preconditioning with the Procrustes ("skew") factor update.

    As `scale_by_quad`, but each dense factor takes a full step and is then rotated
    toward a symmetric matrix by one Procrustes step.

    **Arguments:**

    - `lr_style`, `b1`, `normalize_grads`, `max_size_dense`, `preconditioner_lr`,
        `preconditioner_init_scale`, `dtype`, `scanned_layers`, `block_size`,
        `pipeline_axis_name`, `pipeline_axis_size`, `params_partition_specs`,
        `noise_scale`, `preconditioner_update_probability`, `matmul_dtype`,
        `memory_save_mode`, `stochastic_rounding`, `cache_preconditioner`, `damping`,
        `follow_shards`, `mesh_axis_sizes`: as
        `scale_by_quad` (the same defaults and checks).

    **Returns:**

    An `optax.GradientTransformation`; its state is a `WhiteKronState`.
    """
    config = _config(locals())
    return scale_by_white_kron(Procrustes(), config)


def _skip_whole_step(
    chain: optax.GradientTransformationExtraArgs, needs_params: bool
) -> optax.GradientTransformationExtraArgs:
    """On a step the preconditioner skipped (non-finite gradient), the whole update is zero
    (no weight decay) and the later transforms keep their state (a schedule's count).
    With `needs_params` (a weight decay in the chain), a missing `params` is refused
    before any work is done."""

    def update_fn(updates: Unchecked, state: Any, params: Unchecked = None, **extra_args):
        if needs_params and params is None:
            raise ValueError(
                "`update` needs the current `params` for the weight decay: call "
                "`optimizer.update(grads, opt_state, params)` (with Equinox, `params = "
                "eqx.filter(model, eqx.is_inexact_array)`), or build the optimizer with "
                "`weight_decay=0`."
            )
        new_updates, new_state = chain.update(updates, state, params, **extra_args)
        new_state = typing.cast(tuple, new_state)  # the chain's (white_kron, ..., lr) states
        skipped = new_state[0].last_step_skipped
        new_updates = jax.tree.map(
            lambda u: jax.lax.select(skipped, jnp.zeros_like(u), u), new_updates
        )
        rest = jax.tree.map(lambda old, new: jnp.where(skipped, old, new), state[1:], new_state[1:])
        return new_updates, (new_state[0], *rest)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)  # pyright: ignore


def _no_decay(weight_decay_mask: Any) -> optax.GradientTransformation:
    """The weight decay's place in the chain for a decay of `0`: the state of
    `optax.add_decayed_weights(0, weight_decay_mask)`, and updates passed through
    untouched, without `params`. So the chain's state has one structure whatever the
    decay (a checkpoint saved with one restores into a run with another, as with
    `optax.adamw`)."""
    decay = optax.add_decayed_weights(0.0, weight_decay_mask)

    def update_fn(updates: Unchecked, state: Any, params: Unchecked = None):
        del params
        return updates, state

    return optax.GradientTransformation(decay.init, update_fn)  # pyright: ignore


def _with_decay_and_lr(
    rule: AbstractRule,
    config: Config,
    learning_rate: Any,
    weight_decay: Any,
    weight_decay_mask: Any,
) -> optax.GradientTransformation:
    """`scale_by_white_kron(rule, config)`, then the weight decay and the learning rate,
    both checked here."""
    weight_decay, learning_rate = python_scalar(weight_decay), python_scalar(learning_rate)
    check_weight_decay(weight_decay)
    check_learning_rate(learning_rate)
    # An array (from `optax.inject_hyperparams`) may be traced: it always decays.
    decays = isinstance(weight_decay, jax.Array) or weight_decay > 0
    if decays:
        decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
    else:
        decay = _no_decay(weight_decay_mask)
    chain = optax.chain(
        scale_by_white_kron(rule, config), decay, optax.scale_by_learning_rate(learning_rate)
    )
    return _skip_whole_step(chain, needs_params=decays)


def quad(
    learning_rate: RealScalar | Float[Array, ""] | optax.Schedule = 0.001,
    lr_style: str | None = "adam",
    b1: RealScalar = 0.95,
    weight_decay: RealScalar | Float[Array, ""] = 0.1,
    weight_decay_mask: PyTree | Callable[[Params], PyTree] | None = None,
    normalize_grads: BoolScalar = False,
    max_size_dense: IntScalar = 16384,
    preconditioner_lr: RealScalar = 0.7,
    preconditioner_init_scale: RealScalar | None = 1.0,
    dtype: DTypeLike = jnp.bfloat16,
    scanned_layers: PyTree | None = None,
    block_size: IntScalar = 256,
    pipeline_axis_name: str | tuple[str, ...] | None = None,
    pipeline_axis_size: IntScalar = 1,
    params_partition_specs: PyTree[PartitionSpec] | None = None,
    noise_scale: RealScalar = 1e-9,
    preconditioner_update_probability: RealScalar | optax.Schedule = 1.0,
    matmul_dtype: DTypeLike | None = None,
    memory_save_mode: str | None = None,
    stochastic_rounding: BoolScalar = False,
    cache_preconditioner: BoolScalar = False,
    damping: RealScalar = 0.0,
    follow_shards: BoolScalar = True,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """QUAD: `scale_by_quad`, then `optax.add_decayed_weights(weight_decay,
    weight_decay_mask)`, then `optax.scale_by_learning_rate(learning_rate)`. A step
    whose gradient is not finite is skipped whole: a zero update, and every state but
    the skip count kept.

    Under `optax.inject_hyperparams`, `learning_rate` and `weight_decay` can be injected;
    the others must stay static:
    `optax.inject_hyperparams(wk.quad, static_args=wk.STATIC_ARGS)(learning_rate=3e-3)`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `lr_style`: as `scale_by_quad`.
    - `b1`: as `scale_by_quad`.
    - `weight_decay`: decoupled weight decay (>= 0). With `0` the chain keeps the
        decay's (empty) state, so the state's structure does not depend on it, and
        `update` needs no `params`.
    - `weight_decay_mask`: a tree of bools or a callable `params -> tree`, as optax.
    - `normalize_grads`, `max_size_dense`, `preconditioner_lr`,
        `preconditioner_init_scale`, `dtype`, `scanned_layers`, `block_size`,
        `pipeline_axis_name`, `pipeline_axis_size`, `params_partition_specs`,
        `noise_scale`, `preconditioner_update_probability`, `matmul_dtype`,
        `memory_save_mode`, `stochastic_rounding`, `cache_preconditioner`, `damping`,
        `follow_shards`, `mesh_axis_sizes`: as
        `scale_by_quad`.

    **Returns:**

    An `optax.GradientTransformation`; its state is that of an `optax.chain` whose first
    element is a `WhiteKronState`.
    """
    config = _config(locals())
    return _with_decay_and_lr(Quad(), config, learning_rate, weight_decay, weight_decay_mask)


def skew(
    learning_rate: RealScalar | Float[Array, ""] | optax.Schedule = 0.001,
    lr_style: str | None = "adam",
    b1: RealScalar = 0.95,
    weight_decay: RealScalar | Float[Array, ""] = 0.1,
    weight_decay_mask: PyTree | Callable[[Params], PyTree] | None = None,
    normalize_grads: BoolScalar = False,
    max_size_dense: IntScalar = 16384,
    preconditioner_lr: RealScalar = 0.7,
    preconditioner_init_scale: RealScalar | None = 1.0,
    dtype: DTypeLike = jnp.bfloat16,
    scanned_layers: PyTree | None = None,
    block_size: IntScalar = 256,
    pipeline_axis_name: str | tuple[str, ...] | None = None,
    pipeline_axis_size: IntScalar = 1,
    params_partition_specs: PyTree[PartitionSpec] | None = None,
    noise_scale: RealScalar = 1e-9,
    preconditioner_update_probability: RealScalar | optax.Schedule = 1.0,
    matmul_dtype: DTypeLike | None = None,
    memory_save_mode: str | None = None,
    stochastic_rounding: BoolScalar = False,
    cache_preconditioner: BoolScalar = False,
    damping: RealScalar = 0.0,
    follow_shards: BoolScalar = True,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> optax.GradientTransformation:
    """Skew: `scale_by_skew`, then `optax.add_decayed_weights(weight_decay,
    weight_decay_mask)`, then `optax.scale_by_learning_rate(learning_rate)`. A step
    whose gradient is not finite is skipped whole: a zero update, and every state but
    the skip count kept.

    Under `optax.inject_hyperparams`, `learning_rate` and `weight_decay` can be injected;
    the others must stay static:
    `optax.inject_hyperparams(wk.skew, static_args=wk.STATIC_ARGS)(learning_rate=3e-3)`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `lr_style`: as `scale_by_skew`.
    - `b1`: as `scale_by_skew`.
    - `weight_decay`: decoupled weight decay (>= 0). With `0` the chain keeps the
        decay's (empty) state, so the state's structure does not depend on it, and
        `update` needs no `params`.
    - `weight_decay_mask`: a tree of bools or a callable `params -> tree`, as optax.
    - `normalize_grads`, `max_size_dense`, `preconditioner_lr`,
        `preconditioner_init_scale`, `dtype`, `scanned_layers`, `block_size`,
        `pipeline_axis_name`, `pipeline_axis_size`, `params_partition_specs`,
        `noise_scale`, `preconditioner_update_probability`, `matmul_dtype`,
        `memory_save_mode`, `stochastic_rounding`, `cache_preconditioner`, `damping`,
        `follow_shards`, `mesh_axis_sizes`: as
        `scale_by_skew`.

    **Returns:**

    An `optax.GradientTransformation`; its state is that of an `optax.chain` whose first
    element is a `WhiteKronState`.
    """
    config = _config(locals())
    return _with_decay_and_lr(Procrustes(), config, learning_rate, weight_decay, weight_decay_mask)


def tree_plan(params: Any, **kwargs: Any) -> TreePlan:
    """The static layout the optimizer gives `params`: each leaf's kind and tiles, the
    buckets of dense tiles and the compute groups that update them.

    Nothing is computed: the params are checked and planned as `init` plans them (the
    same function), and the plan is what `init` stores in the state as
    `state.plan.tree`. The compute groups follow the default backend
    (`jax.default_backend()`): on an accelerator, buckets merge into fewer computations.

    **Arguments:**

    - `params`: the parameters (arrays or `jax.ShapeDtypeStruct`s).
    - `**kwargs`: keyword arguments of `quad` / `skew` (those that only `quad` takes,
      `learning_rate`, `weight_decay` and `weight_decay_mask`, change no layout); an
      unknown one raises a `TypeError`, as in `get_opt_state_partition_specs`.

    **Returns:**

    A `TreePlan` (`leaves`: one `LeafPlan` per leaf in flattening order; `buckets`;
    `groups`).
    """
    parameters = inspect.signature(quad).parameters
    if unknown := set(kwargs) - set(parameters):
        raise TypeError(f"Unknown keyword arguments: {sorted(unknown)}.")
    defaults = {name: p.default for name, p in parameters.items()}
    return plan_params(params, _config(defaults | kwargs))[0]
