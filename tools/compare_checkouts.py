"""Compile and step time of two checkouts of the package, side by side in one run.

For a change that should not cost speed (a refactoring): the package as it was (a copy of
an earlier commit's `wkron_eqx/`, imported under another name) and as it is, on the same
trees, their rounds interleaved so that load on the machine falls on both alike.

    git worktree add /tmp/before <commit>
    python tools/compare_checkouts.py /tmp/before --trees transformer12 resnet50

Prints one Markdown row per tree and optimizer: fastest compile (s) and fastest step (ms)
of each, and the ratio after / before.
"""

import argparse
import importlib
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import jax
import jax.numpy as jnp
import numpy as np


_ROOT = Path(__file__).resolve().parents[1]
# `tests/trees.py` needs only jax and numpy; run as a file, it needs no `sys.path` change.
_TREES = runpy.run_path(str(_ROOT / "tests" / "trees.py"))


def _package(checkout: Path):
    """The checkout's `wkron_eqx`, imported as `wkron_eqx_before` (its imports are relative)."""
    target = Path(tempfile.mkdtemp()) / "wkron_eqx_before"
    shutil.copytree(checkout / "wkron_eqx", target)
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("wkron_eqx_before")


def _params(tree: str):
    spec = _TREES["TREES"][tree]()
    params = jax.tree.map(jnp.asarray, _TREES["materialise"](spec["params"], 0, 0.02))
    scanned = _TREES["broadcast_scanned"](spec["params"], spec["scanned"])
    return params, (scanned if spec["scanned"] else None)


def _measure(wk, name: str, params, scanned, rounds: int) -> tuple[float, float]:
    make = getattr(wk, name)
    tx = make(learning_rate=1e-3, dtype=jnp.float32, scanned_layers=scanned)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    start = time.perf_counter()
    step = jax.jit(tx.update).lower(grads, state, params).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(step(grads, state, params))
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(step(grads, state, params))
        best = min(best, time.perf_counter() - start)
    return compile_s, best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="a checkout of the earlier commit")
    parser.add_argument("--trees", nargs="+", default=["transformer12", "resnet50"])
    parser.add_argument("--optimizers", nargs="+", default=["quad", "skew"])
    parser.add_argument("--repeats", type=int, default=3, help="compiles per version")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per compile")
    args = parser.parse_args()
    versions = {"before": _package(args.before), "after": importlib.import_module("wkron_eqx")}
    print(
        "| tree | optimizer | compile s before | after | ratio | step ms before | after | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tree in args.trees:
        params, scanned = _params(tree)
        for name in args.optimizers:
            best = {v: [np.inf, np.inf] for v in versions}
            for _ in range(args.repeats):
                for v, wk in versions.items():
                    jax.clear_caches()
                    c, s = _measure(wk, name, params, scanned, args.rounds)
                    best[v] = [min(best[v][0], c), min(best[v][1], s)]
            (cb, sb), (ca, sa) = best["before"], best["after"]
            print(
                f"| {tree} | {name} | {cb:.2f} | {ca:.2f} | {ca / cb:.2f} "
                f"| {sb:.1f} | {sa:.1f} | {sa / sb:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
