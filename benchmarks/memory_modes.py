"""Optimizer-state size for each `memory_save_mode`, from shapes alone (`jax.eval_shape`:
nothing is allocated), as state bytes / params bytes and the factors' share, float32.

    python -m benchmarks memory_modes [--trees gpt,transformer12,gpt2_small]

`--quick`: the GPT-like tree only (it is shapes alone, seconds either way).
"""

import jax
import jax.numpy as jnp

import wkron_eqx as wk

from ._harness import TREES, abstract_tree, write_results


DESCRIPTION = "optimizer-state size for each memory_save_mode, from shapes alone"
MODES = (None, "one_diag", "all_diag")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def add_arguments(parser):
    parser.add_argument("--trees", default="gpt,transformer12,gpt2_small")


def run(args):
    trees = "gpt" if args.quick else args.trees
    rows = []
    lines = ["| tree | mode | state / params | factors / params |", "|---|---|---|---|"]
    print("\n".join(lines))
    for name in trees.split(","):
        params, scanned = abstract_tree(TREES[name](), jnp.float32)
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
            lines.append(f"| {name} | {mode} | {ratio:.3f} | {share:.3f} |")
            print(lines[-1], flush=True)
    notes = (
        '`scale_by_quad`, float32, from shapes alone (`jax.eval_shape`). "factors" counts the\n'
        "factors and their Lipschitz estimates; the state adds the momentum (1.0x the params)."
    )
    text = "\n".join(lines)
    write_results(args, rows, text, title="State size per `memory_save_mode`", notes=notes)
