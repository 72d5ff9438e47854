"""Hashes of the lowered `init` and `update` programs on a fixed set of trees and options.

A refactoring that should not change what the optimizer computes should not change these
either: run this before and after and compare the two files.

    python tools/lowered_programs.py before.json
    ... change the code ...
    python tools/lowered_programs.py after.json --compare before.json

The trees are the benchmarks' and the tests' (`tests/trees.py`); each is traced for the CPU and the
GPU backend record (nothing is compiled, nothing needs a GPU).
"""

import argparse
import hashlib
import json
import os
import runpy
import sys
from pathlib import Path


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import jax
import jax.numpy as jnp


# `tests/trees.py` needs only jax and numpy; run as a file, it needs no `sys.path` change.
_TREES = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests" / "trees.py"))

TREE_NAMES = ("mlp", "gpt", "conv", "embedding", "transformer12")
OPTIONS = {
    "quad": dict(),
    "skew_p05_cache_sr": dict(
        preconditioner_update_probability=0.5, cache_preconditioner=True, stochastic_rounding=True
    ),
    "quad_init_none": dict(preconditioner_init_scale=None),
    "quad_damping": dict(damping=5e-3),
    "quad_one_diag_b1_0": dict(memory_save_mode="one_diag", b1=0.0),
}


def _abstract(spec: dict):
    def build(node):
        if _TREES["is_shape"](node):
            return jax.ShapeDtypeStruct(node, jnp.float32)
        return {k: build(v) for k, v in node.items()}

    params = build(spec["params"])
    scanned = _TREES["broadcast_scanned"](spec["params"], spec["scanned"])
    return params, (scanned if spec["scanned"] else None)


# State fields left out of the comparison (`--ignore`): a field added on purpose changes
# every program's signature, not what the rest computes. Unused inputs are pruned.
IGNORED: tuple[str, ...] = ()


def _without(fn, fields: tuple[str, ...]):
    """`fn` whose returned `WhiteKronState` (alone, or first of a pair) has `fields` set
    to `None`."""

    def drop(state):
        present = {f: None for f in fields if f in getattr(state, "_fields", ())}
        return state._replace(**present) if present else state

    def wrapped(*args):
        out = fn(*args)
        return (out[0], drop(out[1])) if isinstance(out, tuple) and len(out) == 2 else drop(out)

    wrapped.__name__ = fn.__name__
    return wrapped


def programs() -> dict[str, str]:
    import wkron_eqx as wk
    from wkron_eqx._alias import _config
    from wkron_eqx._rules import Procrustes, Quad
    from wkron_eqx._transform import scale_by_white_kron

    out = {}
    for tree in TREE_NAMES:
        params, scanned = _abstract(_TREES["TREES"][tree]())
        for name, options in OPTIONS.items():
            rule = Procrustes() if name.startswith("skew") else Quad()
            config = _config(dict(options, scanned_layers=scanned))
            for platform in ("cpu", "gpu"):
                tx = scale_by_white_kron(rule, config, wk.Backend.of(platform))
                state = jax.eval_shape(tx.init, params)
                init = jax.jit(_without(tx.init, IGNORED)).lower(params).as_text()
                update = jax.jit(_without(tx.update, IGNORED)).lower(params, state).as_text()
                for what, text in (("init", init), ("update", update)):
                    key = f"{tree}/{name}/{platform}/{what}"
                    out[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
                    print(key, out[key], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="where to write the hashes (JSON)")
    parser.add_argument("--compare", help="an earlier output to compare with")
    parser.add_argument("--ignore", nargs="*", default=(), help="state fields left out")
    args = parser.parse_args()
    global IGNORED
    IGNORED = tuple(args.ignore)
    hashes = programs()
    Path(args.output).write_text(json.dumps(hashes, indent=1))
    if args.compare is None:
        return 0
    before = json.loads(Path(args.compare).read_text())
    changed = sorted(k for k in hashes if before.get(k) != hashes[k])
    print(f"{len(hashes) - len(changed)} of {len(hashes)} programs identical")
    for k in changed:
        print("changed:", k)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
