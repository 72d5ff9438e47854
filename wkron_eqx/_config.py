"""`Config`: the hyperparameters of `scale_by_quad` / `scale_by_skew`, their defaults and
their checks; and the checks of the two arguments only `quad` / `skew` take."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from ._custom_types import ALLOWED_DTYPES
from ._layout import MEMORY_SAVE_MODES


# A number argument of the factories: a Python number or a NumPy scalar (`Config` keeps the
# Python number it holds). Ints count as reals, as in PEP 484's numeric tower, which runtime
# type checkers do not apply by themselves.
RealScalar: TypeAlias = float | int | np.floating | np.integer
IntScalar: TypeAlias = int | np.integer
BoolScalar: TypeAlias = bool | np.bool_


def python_scalar(x: Any) -> Any:
    """A NumPy scalar (`np.float32(0.9)`, `np.int64(8)`, `np.bool_(True)`) as the Python
    number it holds; anything else unchanged."""
    return x.item() if isinstance(x, np.generic) else x


def python_float(x: Any) -> Any:
    """As `python_scalar`, and an int (not a bool) as the float it equals, so that a
    float hyperparameter given as `1` is a `float` wherever it goes; anything else (a
    bool, an array, a string) unchanged, for the checks to refuse."""
    x = python_scalar(x)
    return float(x) if isinstance(x, int) and not isinstance(x, bool) else x


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fail(name: str, value: Any, allowed: str):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_positive_int(name: str, value: Any):
    if not (_is_int(value) and value >= 1):
        _fail(name, value, "an int >= 1")


def _check_positive_float(name: str, value: Any):
    if not (_is_number(value) and 0 < value < math.inf):
        _fail(name, value, "a finite float > 0")


def _canonical_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        canonical = None
    if canonical is None or canonical not in ALLOWED_DTYPES:
        allowed = ", ".join(d.name for d in ALLOWED_DTYPES)
        raise ValueError(f"`{name}` must be one of {allowed}, got {dtype!r}.")
    return canonical


def _axis_sizes(x: Any) -> Any:
    """`mesh_axis_sizes` as sorted `(name, size)` pairs (hashable), from a dict or a
    `jax.sharding` mesh's `.shape`; anything else is left for the check."""
    if isinstance(x, Mapping):
        try:
            return tuple(sorted((n, python_scalar(k)) for n, k in x.items()))
        except TypeError:
            return x
    return x


def _refuse_arrays(config: "Config"):
    # Checked first and all at once: `optax.inject_hyperparams` without `static_args`
    # turns every number into an array, and one message should name every fix.
    arrays = [
        f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), jax.Array)
    ]
    if arrays:
        names = ", ".join(f"`{name}`" for name in arrays)
        raise ValueError(
            f"{names} must be Python values, got arrays: they set shapes, dtypes and branches "
            "when the step is traced. Under `optax.inject_hyperparams`, only `learning_rate` "
            "and `weight_decay` of `quad` / `skew` can be injected; keep every other argument "
            f"static with `static_args=wk.STATIC_ARGS`, that is\n    static_args={STATIC_ARGS!r}"
        )


class Config(eqx.Module):
    """The validated hyperparameters of `scale_by_quad` / `scale_by_skew`: the one place
    their checks live. The factories' signatures spell the defaults out again (for
    readers, type checkers and the docs), and a test ties each of them to these.

    Every field has the name and default of the reference (eformer's `white_kron`), plus
    `preconditioner_update_probability`, `matmul_dtype`, `memory_save_mode`,
    `stochastic_rounding`, `cache_preconditioner` and `damping`; the
    factories' arguments of
    the same names are documented there. Number fields are checked when the Config is
    built: a bad value raises a `ValueError` naming the argument and what it allows.
    `scanned_layers` and `params_partition_specs` are trees, checked against the params
    by `init`. NumPy scalars become the Python numbers they hold (`python_scalar`).
    """

    lr_style: str | None = "adam"
    b1: float = eqx.field(default=0.95, converter=python_float)
    normalize_grads: bool = eqx.field(default=False, converter=python_scalar)
    max_size_dense: int = eqx.field(default=16384, converter=python_scalar)
    preconditioner_lr: float = eqx.field(default=0.7, converter=python_float)
    preconditioner_init_scale: float | None = eqx.field(default=1.0, converter=python_float)
    dtype: DTypeLike = jnp.bfloat16
    scanned_layers: Any = None
    block_size: int = eqx.field(default=256, converter=python_scalar)
    pipeline_axis_name: str | tuple[str, ...] | None = eqx.field(
        default=None, converter=lambda x: tuple(x) if isinstance(x, list) else x
    )
    pipeline_axis_size: int = eqx.field(default=1, converter=python_scalar)
    params_partition_specs: Any = None
    noise_scale: float = eqx.field(default=1e-9, converter=python_float)
    preconditioner_update_probability: float | optax.Schedule = eqx.field(
        default=1.0, converter=python_scalar
    )
    matmul_dtype: DTypeLike | None = None
    memory_save_mode: str | None = None
    stochastic_rounding: bool = eqx.field(default=False, converter=python_scalar)
    cache_preconditioner: bool = eqx.field(default=False, converter=python_scalar)
    damping: float = eqx.field(default=0.0, converter=python_float)
    follow_shards: bool = eqx.field(default=True, converter=python_scalar)
    mesh_axis_sizes: tuple[tuple[str, int], ...] | None = eqx.field(
        default=None, converter=_axis_sizes
    )

    def __check_init__(self):
        _refuse_arrays(self)
        if self.lr_style not in ("adam", None):
            _fail("lr_style", self.lr_style, 'one of "adam" or None')
        if not (_is_number(self.b1) and 0 <= self.b1 < 1):
            _fail("b1", self.b1, "a float in [0, 1)")
        if not isinstance(self.normalize_grads, bool):
            _fail("normalize_grads", self.normalize_grads, "a bool")
        _check_positive_int("max_size_dense", self.max_size_dense)
        _check_positive_float("preconditioner_lr", self.preconditioner_lr)
        if self.preconditioner_init_scale is not None:
            _check_positive_float("preconditioner_init_scale", self.preconditioner_init_scale)
        _canonical_dtype(self.dtype)
        _check_positive_int("block_size", self.block_size)
        names = self.pipeline_axis_name
        if not (
            names is None
            or isinstance(names, str)
            or (
                isinstance(names, tuple)
                and names
                and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names)
            )
        ):
            _fail("pipeline_axis_name", names, "a str, a tuple of distinct strs, or None")
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
        if self.matmul_dtype is not None:
            _canonical_dtype(self.matmul_dtype, "matmul_dtype")
        if self.memory_save_mode not in MEMORY_SAVE_MODES:
            _fail("memory_save_mode", self.memory_save_mode, 'one of None, "one_diag", "all_diag"')
        if not isinstance(self.stochastic_rounding, bool):
            _fail("stochastic_rounding", self.stochastic_rounding, "a bool")
        if not isinstance(self.cache_preconditioner, bool):
            _fail("cache_preconditioner", self.cache_preconditioner, "a bool")
        if not (_is_number(self.damping) and 0 <= self.damping < math.inf):
            _fail("damping", self.damping, "a finite float >= 0 (0 turns it off)")
        if not isinstance(self.follow_shards, bool):
            _fail("follow_shards", self.follow_shards, "a bool")
        sizes = self.mesh_axis_sizes
        if sizes is not None and not (
            isinstance(sizes, tuple)
            and all(
                isinstance(p, tuple)
                and len(p) == 2
                and isinstance(p[0], str)
                and _is_int(p[1])
                and not isinstance(p[1], bool)
                and p[1] > 0
                for p in sizes
            )
        ):
            _fail("mesh_axis_sizes", sizes, "a dict of mesh axis names to positive ints, or None")
        if self.damping > 0 and self.normalize_grads:
            raise ValueError(
                "`damping` follows the size of each leaf's input, which `normalize_grads` "
                "fixes at unit norm: it would never act. Use one or the other."
            )

    @property
    def caches(self) -> bool:
        """Whether the state stores the preconditioner's sides: with
        `cache_preconditioner`, unless every step updates the factors (a constant
        probability of 1), when no step would read them."""
        prob = self.preconditioner_update_probability
        return self.cache_preconditioner and (callable(prob) or prob < 1)

    @property
    def initial_scale(self) -> float:
        """The scale the factors are initialised with: `preconditioner_init_scale`, or 1
        when it is `None` (each leaf's factors are then rescaled from its first input,
        on the first step)."""
        scale = self.preconditioner_init_scale
        return 1.0 if scale is None else scale

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype the factors and the momentum are stored in, and the 1-D leaves'
        maths runs in (the products use `Backend.product_dtype`)."""
        return _canonical_dtype(self.dtype)


# The arguments of `quad` / `skew` that `optax.inject_hyperparams` must keep static:
# every one but `learning_rate` and `weight_decay` (`Config`'s fields, and the decay's
# mask). They set shapes, dtypes and branches when the step is traced.
STATIC_ARGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config)) + (
    "weight_decay_mask",
)


def check_weight_decay(weight_decay: Any):
    """Refuse a bad `weight_decay` of `quad` / `skew` with a `ValueError`. A 0-d float
    array (as `optax.inject_hyperparams` passes it, possibly traced) is accepted as is."""
    if isinstance(weight_decay, jax.Array):
        if weight_decay.ndim != 0 or not jnp.issubdtype(weight_decay.dtype, jnp.floating):
            _fail("weight_decay", weight_decay, "a finite float >= 0 or a 0-d float array")
        return
    if not (_is_number(weight_decay) and 0 <= weight_decay < math.inf):
        _fail("weight_decay", weight_decay, "a finite float >= 0")


def check_learning_rate(learning_rate: Any):
    """Refuse a bad `learning_rate` of `quad` / `skew` with a `ValueError`. A schedule or
    an array (as `optax.inject_hyperparams` passes it) is accepted as is."""
    if callable(learning_rate) or isinstance(learning_rate, jax.Array):
        return
    if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate)):
        _fail("learning_rate", learning_rate, "a finite float or a schedule")
