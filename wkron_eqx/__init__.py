"""Kronecker-factored PSGD optimizers for JAX: QUAD (`quad`, `scale_by_quad`) and
Procrustes "white Kron" (`skew`, `scale_by_skew`), as optax transforms."""

import importlib.metadata

from ._alias import (
    STATIC_ARGS as STATIC_ARGS,
    quad as quad,
    scale_by_quad as scale_by_quad,
    scale_by_skew as scale_by_skew,
    skew as skew,
    tree_plan as tree_plan,
)
from ._backend import Backend as Backend
from ._config import Config as Config
from ._layout import (
    DENSE_PATH as DENSE_PATH,
    LARGE_PATH as LARGE_PATH,
    ONE_D_PATH as ONE_D_PATH,
    DenseLayout as DenseLayout,
    LargeLayout as LargeLayout,
    LeafKind as LeafKind,
    LeafPlan as LeafPlan,
    OneDLayout as OneDLayout,
    ShardGrid as ShardGrid,
    TreePlan as TreePlan,
)
from ._rules import AbstractRule as AbstractRule, Procrustes as Procrustes, Quad as Quad
from ._schedules import precond_update_prob_schedule as precond_update_prob_schedule
from ._specs import get_opt_state_partition_specs as get_opt_state_partition_specs
from ._state import (
    DenseState as DenseState,
    LeafState as LeafState,
    Plan as Plan,
    PreconditionerCache as PreconditionerCache,
    WhiteKronState as WhiteKronState,
)
from ._stats import preconditioner_stats as preconditioner_stats
from ._transform import scale_by_white_kron as scale_by_white_kron


__version__ = importlib.metadata.version("wkron_eqx")
del importlib  # not part of the namespace

# Sorted (as `sorted` orders them): a name added anywhere merges cleanly.
__all__ = [
    "AbstractRule",
    "Backend",
    "Config",
    "DENSE_PATH",
    "DenseLayout",
    "DenseState",
    "LARGE_PATH",
    "LargeLayout",
    "LeafKind",
    "LeafPlan",
    "LeafState",
    "ONE_D_PATH",
    "OneDLayout",
    "Plan",
    "PreconditionerCache",
    "Procrustes",
    "Quad",
    "STATIC_ARGS",
    "ShardGrid",
    "TreePlan",
    "WhiteKronState",
    "get_opt_state_partition_specs",
    "precond_update_prob_schedule",
    "preconditioner_stats",
    "quad",
    "scale_by_quad",
    "scale_by_skew",
    "scale_by_white_kron",
    "skew",
    "tree_plan",
]
