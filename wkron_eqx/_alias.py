"""The public factories: `scale_by_quad`, `scale_by_skew` and the `quad`, `skew` aliases."""

import math
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from ._config import Config, check_arguments, check_weight_decay, python_scalar
from ._custom_types import Params, Updates
from ._rules import AbstractRule, Procrustes, Quad
from ._transform import scale_by_white_kron


_SCALE_DOC_ARGS = """
    **Arguments:**

    - `lr_style`: `"adam"` divides the (RMS-clipped) update by 5 so that learning rates
        tuned for Adam carry over; `None` leaves it as is.
    - `b1`: momentum coefficient in `[0, 1)`; `0` preconditions the raw gradient.
    - `normalize_grads`: divide each leaf's input by its norm (plus `1e-6`) first.
    - `max_size_dense`: a side longer than this gets a diagonal factor (`LARGE_PATH`).
    - `preconditioner_lr`: factor step size; it decays as `lr / sqrt(1 + t/10000)`
        down to `min(lr, 0.4)`.
    - `preconditioner_init_scale`: initial factors are this times the identity.
    - `dtype`: storage and compute dtype of the preconditioner and momentum
        (`jnp.float32` or `jnp.bfloat16`).
    - `scanned_layers`: a bool or a (prefix) tree of bools; a flagged leaf's leading axis
        is a stack of independent layers, each preconditioned separately.
    - `block_size`: the largest side of a dense tile.
    - `pipeline_axis_name`: mesh axis over which stacked factors are sharded.
    - `pipeline_axis_size`: stacks are padded with inert dummies to a multiple of this.
    - `params_partition_specs`: a `PartitionSpec` or tree of them for the params; the
        momentum is constrained to it.
    - `noise_scale`: scale of the Gaussian noise added to the gradient for the factor
        update (never to the output).
    - `preconditioner_update_probability`: a float in `(0, 1]` or a schedule `step -> p`;
        the factors are updated once every `1/p` steps (deterministic counter), other
        steps only apply them. `1.0` updates every step.
    - `matmul_dtype`: the dtype the Kronecker products (and the factor updates of dense
        and strip factors) run in; the factors are still stored in `dtype`. `None`
        (default): `dtype`, except `jnp.float32` when `dtype` is bfloat16 and the default
        backend is the CPU (which has no bfloat16 matmul: it would compute in float32
        anyway and round every product). `jnp.bfloat16` rounds as the reference does.
"""


def _factory(rule: AbstractRule):
    @typing.no_type_check  # bad values get check_arguments' ValueError, checker or not
    def scale_by(
        lr_style: str | None = "adam",
        b1: float = 0.95,
        normalize_grads: bool = False,
        max_size_dense: int = 16384,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float = 1.0,
        dtype: Any = jnp.bfloat16,
        scanned_layers: Any = None,
        block_size: int = 256,
        pipeline_axis_name: str | None = None,
        pipeline_axis_size: int = 1,
        params_partition_specs: Any = None,
        noise_scale: float = 1e-9,
        preconditioner_update_probability: float | Callable[[Any], Any] = 1.0,
        matmul_dtype: Any = None,
    ) -> optax.GradientTransformation:
        arguments = dict(
            lr_style=lr_style,
            b1=b1,
            normalize_grads=normalize_grads,
            max_size_dense=max_size_dense,
            preconditioner_lr=preconditioner_lr,
            preconditioner_init_scale=preconditioner_init_scale,
            dtype=dtype,
            scanned_layers=scanned_layers,
            block_size=block_size,
            pipeline_axis_name=pipeline_axis_name,
            pipeline_axis_size=pipeline_axis_size,
            params_partition_specs=params_partition_specs,
            noise_scale=noise_scale,
            preconditioner_update_probability=preconditioner_update_probability,
            matmul_dtype=matmul_dtype,
        )
        arguments = {k: python_scalar(v) for k, v in arguments.items()}
        # Checked before building the Config, so that a value of the wrong type gets this
        # ValueError even where a runtime type checker guards Config's annotations.
        check_arguments(**arguments)
        config = Config(**arguments)
        return scale_by_white_kron(rule, config)

    return scale_by


scale_by_quad = _factory(Quad())
scale_by_quad.__name__ = scale_by_quad.__qualname__ = "scale_by_quad"
scale_by_quad.__doc__ = (
    """Kronecker-factored preconditioning with the QUAD factor update.

    Momentum, then each leaf preconditioned by its Kronecker factors (updated this step),
    then the RMS of each leaf's update clipped to 1.1, then the `lr_style` scaling.
    """
    + _SCALE_DOC_ARGS
    + """
    **Returns:**

    An `optax.GradientTransformation`; its state is a `WhiteKronState`.
    """
)

scale_by_skew = _factory(Procrustes())
scale_by_skew.__name__ = scale_by_skew.__qualname__ = "scale_by_skew"
scale_by_skew.__doc__ = (
    """Kronecker-factored preconditioning with the Procrustes ("skew") factor update.

    As `scale_by_quad`, but each dense factor takes a full step and is then rotated
    toward a symmetric matrix by one Procrustes step.
    """
    + _SCALE_DOC_ARGS
    + """
    **Returns:**

    An `optax.GradientTransformation`; its state is a `WhiteKronState`.
    """
)


def _skip_whole_step(
    chain: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
    """On a step the preconditioner skipped (non-finite gradient), the whole update is zero
    (no weight decay) and the later transforms keep their state (a schedule's count)."""

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra_args):
        new_updates, new_state = chain.update(updates, state, params, **extra_args)
        new_state = typing.cast(tuple, new_state)  # the chain's (white_kron, ..., lr) states
        skipped = new_state[0].skipped_steps != state[0].skipped_steps
        new_updates = jax.tree.map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), new_updates)
        rest = jax.tree.map(lambda old, new: jnp.where(skipped, old, new), state[1:], new_state[1:])
        return new_updates, (new_state[0], *rest)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)  # pyright: ignore


def _with_decay_and_lr(scale_by: Callable[..., optax.GradientTransformation], name: str):
    @typing.no_type_check  # bad values get a ValueError, runtime type checker or not
    def optimizer(
        learning_rate: float | Array | Callable[[Any], Any] = 0.001,
        lr_style: str | None = "adam",
        b1: float = 0.95,
        weight_decay: float | Array = 0.1,
        weight_decay_mask: Any = None,
        normalize_grads: bool = False,
        max_size_dense: int = 16384,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float = 1.0,
        dtype: Any = jnp.bfloat16,
        scanned_layers: Any = None,
        block_size: int = 256,
        pipeline_axis_name: str | None = None,
        pipeline_axis_size: int = 1,
        params_partition_specs: Any = None,
        noise_scale: float = 1e-9,
        preconditioner_update_probability: float | Callable[[Any], Any] = 1.0,
        matmul_dtype: Any = None,
    ) -> optax.GradientTransformation:
        weight_decay, learning_rate = python_scalar(weight_decay), python_scalar(learning_rate)
        check_weight_decay(weight_decay)
        if not callable(learning_rate) and not isinstance(learning_rate, jax.Array):
            if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate)):
                raise ValueError(
                    f"`learning_rate` must be a finite float or a schedule, got {learning_rate!r}."
                )
        parts = [
            scale_by(
                lr_style=lr_style,
                b1=b1,
                normalize_grads=normalize_grads,
                max_size_dense=max_size_dense,
                preconditioner_lr=preconditioner_lr,
                preconditioner_init_scale=preconditioner_init_scale,
                dtype=dtype,
                scanned_layers=scanned_layers,
                block_size=block_size,
                pipeline_axis_name=pipeline_axis_name,
                pipeline_axis_size=pipeline_axis_size,
                params_partition_specs=params_partition_specs,
                noise_scale=noise_scale,
                preconditioner_update_probability=preconditioner_update_probability,
                matmul_dtype=matmul_dtype,
            )
        ]
        # An array (from `optax.inject_hyperparams`) may be traced: always add it.
        if isinstance(weight_decay, jax.Array) or weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
        parts.append(optax.scale_by_learning_rate(learning_rate))
        return _skip_whole_step(optax.chain(*parts))

    optimizer.__name__ = optimizer.__qualname__ = name
    return optimizer


quad = _with_decay_and_lr(scale_by_quad, "quad")
quad.__doc__ = """QUAD: `scale_by_quad`, then `optax.add_decayed_weights(weight_decay,
    weight_decay_mask)` when `weight_decay > 0`, then
    `optax.scale_by_learning_rate(learning_rate)`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `weight_decay`: decoupled weight decay (>= 0); `0` leaves it out of the chain.
    - `weight_decay_mask`: a tree of bools or a callable `params -> tree`, as optax.
    - everything else: as `scale_by_quad`.

    **Returns:**

    An `optax.GradientTransformation` (an `optax.chain`).
    """
skew = _with_decay_and_lr(scale_by_skew, "skew")
skew.__doc__ = quad.__doc__.replace("QUAD: `scale_by_quad`", "Skew: `scale_by_skew`").replace(
    "as `scale_by_quad`", "as `scale_by_skew`"
)
