"""The leaf kinds, each a final `AbstractKind` (see `_base`): dense tiles in shared
buckets, large leaves with diagonal sides and strips, and 1-D leaves. The step loops over
`KINDS` without naming one."""

from ._base import AbstractKind as AbstractKind, StateParts as StateParts
from .dense import DenseKind
from .large import LargeKind
from .one_d import OneDKind


KINDS: tuple[AbstractKind, ...] = (DenseKind(), LargeKind(), OneDKind())
