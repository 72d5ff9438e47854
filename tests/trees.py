"""Parameter trees (shapes only) that the structure tests trace: the shapes the benchmarks
time (`benchmarks/_trees.py`, one source for both), and `mixed(n)` for growth in the
number of leaves.

`benchmarks/` is a script folder, not a package, and `_trees.py` must stay free of
`wkron_eqx` (the reference's benchmark runs it in an environment without it), so the
tests neither import it nor put it on `sys.path`: its file is run on its own, with
`runpy`, and its names are taken from the result.
"""

import runpy
from pathlib import Path

import jax
import jax.numpy as jnp


_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "_trees.py"
_NAMES = runpy.run_path(str(_SCRIPT))

TREES: dict = _NAMES["TREES"]
mixed = _NAMES["mixed"]
is_shape = _NAMES["is_shape"]
broadcast_scanned = _NAMES["broadcast_scanned"]


def abstract_tree(spec: dict, dtype=jnp.float32):
    """`(params, scanned_layers)` of a spec: `jax.ShapeDtypeStruct` leaves (nothing is
    allocated) and the full tree of flags, or None when nothing is scanned."""

    def build(node):
        if is_shape(node):
            return jax.ShapeDtypeStruct(node, dtype)
        return {k: build(v) for k, v in node.items()}

    params = build(spec["params"])
    scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
    return params, scanned
