import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import ALLOWED_DTYPES


def python_scalar(x: Any) -> Any:
    """A NumPy scalar (`np.float32(0.9)`, `np.int64(8)`, `np.bool_(True)`) as the Python
    number it holds; anything else unchanged."""
    return x.item() if isinstance(x, np.generic) else x


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fail(name: str, value: Any, allowed: str):
    hint = ""
    if isinstance(value, jax.Array):
        hint = (
            " With `optax.inject_hyperparams`, name every argument but the injected ones in "
            "`static_args` (array values of this one cannot be traced)."
        )
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.{hint}")


def _check_positive_int(name: str, value: Any):
    if not (_is_int(value) and value >= 1):
        _fail(name, value, "an int >= 1")


def _canonical_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        canonical = None
    if canonical is None or canonical not in ALLOWED_DTYPES:
        allowed = ", ".join(d.name for d in ALLOWED_DTYPES)
        raise ValueError(f"`{name}` must be one of {allowed}, got {dtype!r}.")
    return canonical


# Not type-checked at run time, so that a wrong type under a runtime checker (jaxtyping +
# beartype) still gets the `ValueError` naming the argument, as it does without one.
@typing.no_type_check
def check_arguments(
    lr_style,
    b1,
    normalize_grads,
    max_size_dense,
    preconditioner_lr,
    preconditioner_init_scale,
    dtype,
    scanned_layers,
    block_size,
    pipeline_axis_name,
    pipeline_axis_size,
    params_partition_specs,
    noise_scale,
    preconditioner_update_probability,
    matmul_dtype,
):
    """Raise `ValueError` naming the first argument of `scale_by_quad` that is out of range."""
    del scanned_layers, params_partition_specs  # trees: checked against the params at init
    if lr_style not in ("adam", None):
        _fail("lr_style", lr_style, 'one of "adam" or None')
    if not (_is_number(b1) and 0 <= b1 < 1):
        _fail("b1", b1, "a float in [0, 1)")
    if not isinstance(normalize_grads, bool):
        _fail("normalize_grads", normalize_grads, "a bool")
    _check_positive_int("max_size_dense", max_size_dense)
    if not (_is_number(preconditioner_lr) and 0 < preconditioner_lr < math.inf):
        _fail("preconditioner_lr", preconditioner_lr, "a finite float > 0")
    scale = preconditioner_init_scale
    if not (_is_number(scale) and 0 < scale < math.inf):
        _fail("preconditioner_init_scale", scale, "a finite float > 0")
    _canonical_dtype(dtype)
    _check_positive_int("block_size", block_size)
    if not (pipeline_axis_name is None or isinstance(pipeline_axis_name, str)):
        _fail("pipeline_axis_name", pipeline_axis_name, "a str or None")
    _check_positive_int("pipeline_axis_size", pipeline_axis_size)
    if not (_is_number(noise_scale) and 0 <= noise_scale < math.inf):
        _fail("noise_scale", noise_scale, "a finite float >= 0")
    prob = preconditioner_update_probability
    if not callable(prob) and not (_is_number(prob) and 0 < prob <= 1):
        _fail(
            "preconditioner_update_probability",
            prob,
            "a float in (0, 1] or a callable of the step",
        )
    if matmul_dtype is not None:
        _canonical_dtype(matmul_dtype, "matmul_dtype")


class Config(eqx.Module):
    """The validated hyperparameters of `scale_by_quad` / `scale_by_skew`.

    Every field has the name and default of the reference (eformer's `white_kron`),
    plus `preconditioner_update_probability` and `matmul_dtype`. Python-number fields
    are checked when the Config is built, so a bad value fails at construction with a
    `ValueError` naming the argument and its allowed range.
    """

    lr_style: str | None = "adam"
    b1: float | int = 0.95
    normalize_grads: bool = False
    max_size_dense: int = 16384
    preconditioner_lr: float | int = 0.7
    preconditioner_init_scale: float | int = 1.0
    dtype: Any = jnp.bfloat16
    scanned_layers: Any = None
    block_size: int = 256
    pipeline_axis_name: str | None = None
    pipeline_axis_size: int = 1
    params_partition_specs: Any = None
    noise_scale: float | int = 1e-9
    preconditioner_update_probability: float | int | Callable[[Any], Any] = 1.0
    matmul_dtype: Any = None

    def __check_init__(self):
        check_arguments(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype the factors and the momentum are stored in, and the 1-D leaves'
        maths runs in (the products use `product_dtype`)."""
        return _canonical_dtype(self.dtype)

    @property
    def product_dtype(self) -> jnp.dtype:
        """The dtype the Kronecker products of the dense and strip stacks run in.

        `matmul_dtype` when given. Otherwise `dtype`, except bfloat16 on a CPU backend,
        which gets float32: XLA's CPU backend has no bfloat16 matrix multiply; it runs
        each one in float32 and rounds the result back, which costs a conversion pass
        per product (and its compile time) and loses precision for nothing.
        """
        if self.matmul_dtype is not None:
            return _canonical_dtype(self.matmul_dtype, "matmul_dtype")
        storage = self.compute_dtype
        if storage.itemsize < 4 and jax.default_backend() == "cpu":
            return jnp.dtype(jnp.float32)
        return storage


@typing.no_type_check
def check_weight_decay(weight_decay):
    """Validate the `weight_decay` argument of `quad` / `skew`. A 0-d floating array
    (e.g. injected by `optax.inject_hyperparams`, possibly traced) is accepted as is."""
    if isinstance(weight_decay, jax.Array):
        if weight_decay.ndim != 0 or not jnp.issubdtype(weight_decay.dtype, jnp.floating):
            _fail("weight_decay", weight_decay, "a finite float >= 0 or a 0-d float array")
        return
    if not (_is_number(weight_decay) and 0 <= weight_decay < math.inf):
        _fail("weight_decay", weight_decay, "a finite float >= 0")
