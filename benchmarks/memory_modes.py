"""Optimizer-state size for each `memory_save_mode`, from shapes alone (`jax.eval_shape`:
nothing is allocated), as state bytes / params bytes and the factors' share, float32.

    python benchmarks/memory_modes.py
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from _trees import TREES, broadcast_scanned

import wkron_eqx as wk


RESULTS = Path(__file__).parent / "results"
MODES = (None, "one_diag", "all_diag")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
    rows = []
    print("| tree | mode | state / params | factors / params |")
    print("|---|---|---|---|")
    for name in ("gpt", "transformer12", "gpt2_small"):
        spec = TREES[name]()
        build = lambda node: (
            jax.ShapeDtypeStruct(node, jnp.float32)
            if isinstance(node, tuple)
            else {k: build(v) for k, v in node.items()}
        )
        params = build(spec["params"])
        scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
        for mode in MODES:
            tx = wk.scale_by_quad(dtype=jnp.float32, scanned_layers=scanned, memory_save_mode=mode)
            state = jax.eval_shape(tx.init, params)
            factors = _bytes((state.dense, state.large, state.one_d))
            ratio, share = _bytes(state) / _bytes(params), factors / _bytes(params)
            rows.append(
                {
                    "tree": name,
                    "mode": mode,
                    "state_over_params": ratio,
                    "factors_over_params": share,
                }
            )
            print(f"| {name} | {mode} | {ratio:.3f} | {share:.3f} |", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_modes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
