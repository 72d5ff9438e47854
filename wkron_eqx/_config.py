import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from ._custom_types import ALLOWED_DTYPES


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fail(name: str, value: Any, allowed: str):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_positive_int(name: str, value: Any):
    if not (_is_int(value) and value >= 1):
        _fail(name, value, "an int >= 1")


def _canonical_dtype(dtype: Any) -> jnp.dtype:
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        canonical = None
    if canonical is None or canonical not in ALLOWED_DTYPES:
        allowed = ", ".join(d.name for d in ALLOWED_DTYPES)
        raise ValueError(f"`dtype` must be one of {allowed}, got {dtype!r}.")
    return canonical


class Config(eqx.Module):
    """The validated hyperparameters of `scale_by_quad` / `scale_by_skew`.

    Every field has the name and default of the reference (eformer's `white_kron`),
    plus `preconditioner_update_probability`. Python-number fields are checked when
    the Config is built, so a bad value fails at construction with a `ValueError`
    naming the argument and its allowed range.
    """

    lr_style: str | None = "adam"
    b1: float = 0.95
    normalize_grads: bool = False
    max_size_dense: int = 16384
    preconditioner_lr: float = 0.7
    preconditioner_init_scale: float = 1.0
    dtype: Any = jnp.bfloat16
    scanned_layers: Any = None
    block_size: int = 256
    pipeline_axis_name: str | None = None
    pipeline_axis_size: int = 1
    params_partition_specs: Any = None
    noise_scale: float = 1e-9
    preconditioner_update_probability: float | Callable[[Any], Any] = 1.0

    def __check_init__(self):
        if self.lr_style not in ("adam", None):
            _fail("lr_style", self.lr_style, 'one of "adam" or None')
        if not (_is_number(self.b1) and 0 <= self.b1 < 1):
            _fail("b1", self.b1, "a float in [0, 1)")
        if not isinstance(self.normalize_grads, bool):
            _fail("normalize_grads", self.normalize_grads, "a bool")
        _check_positive_int("max_size_dense", self.max_size_dense)
        if not (_is_number(self.preconditioner_lr) and self.preconditioner_lr > 0):
            _fail("preconditioner_lr", self.preconditioner_lr, "a finite float > 0")
        if not math.isfinite(self.preconditioner_lr):
            _fail("preconditioner_lr", self.preconditioner_lr, "a finite float > 0")
        scale = self.preconditioner_init_scale
        if not (_is_number(scale) and 0 < scale < math.inf):
            _fail("preconditioner_init_scale", scale, "a finite float > 0")
        _canonical_dtype(self.dtype)
        _check_positive_int("block_size", self.block_size)
        if not (self.pipeline_axis_name is None or isinstance(self.pipeline_axis_name, str)):
            _fail("pipeline_axis_name", self.pipeline_axis_name, "a str or None")
        _check_positive_int("pipeline_axis_size", self.pipeline_axis_size)
        if not (_is_number(self.noise_scale) and 0 <= self.noise_scale < math.inf):
            _fail("noise_scale", self.noise_scale, "a finite float >= 0")
        prob = self.preconditioner_update_probability
        if not callable(prob) and not (_is_number(prob) and 0 < prob <= 1):
            _fail(
                "preconditioner_update_probability",
                prob,
                "a float in (0, 1] or a callable of the step",
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype the preconditioner maths runs and is stored in."""
        return _canonical_dtype(self.dtype)


def check_weight_decay(weight_decay: Any):
    """Validate the `weight_decay` argument of `quad` / `skew`."""
    if not (_is_number(weight_decay) and 0 <= weight_decay < math.inf):
        _fail("weight_decay", weight_decay, "a finite float >= 0")
