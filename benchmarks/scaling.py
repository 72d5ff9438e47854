"""Compile time and XLA temp memory against the number of leaves: ours and the reference.

    python -m benchmarks scaling [--sizes 8,32,128,256] [--reference-python .refenv/bin/python]
    python -m benchmarks scaling --trees transformer12,resnet50,gpt2_small --rounds 3

A tree of N leaves cycles through matrices, vectors and conv kernels (`mixed`); for each
N, `jax.jit(tx.update).lower(...)` and `.compile()` are timed with cold caches, ours then
the reference's (eformer 0.0.101, in its own virtual environment), `quad` and `skew`,
float32, each in a fresh interpreter. Shapes only: nothing is run, so the numbers are
compile costs. Writes `benchmarks/results/scaling.{json,md}`: the growth from the
smallest N and the ratio to the reference. `--quick`: 8 leaves, quad only.
"""

import json
import os
import sys

import jax

from ._harness import (
    TREES,
    environment,
    last_json,
    reference_python,
    run_python,
    write_results,
)


DESCRIPTION = "compile time and XLA temp memory against the number of leaves, and the reference"
OPTIMIZERS = ("quad", "skew")

# Run in both interpreters: builds the abstract tree and measures one optimizer.
MEASURE = r"""
import json
import jax.numpy as jnp
from benchmarks._harness import TREES, abstract_tree, compile_only, mixed
{import_line}
spec = mixed({n}) if {tree!r} == "mixed" else TREES[{tree!r}]()
params, scanned = abstract_tree(spec, jnp.float32)
tx = getattr(opt, {name!r})(learning_rate=1e-3, dtype=jnp.float32, scanned_layers=scanned)
print(json.dumps(compile_only(tx, params, params)))
"""

OURS = "import wkron_eqx as opt"
REFERENCE = "from eformer.optimizers._tx import white_kron as opt"


def measure(python: str, import_line: str, tree: str, n: int, name: str) -> dict:
    """One measurement in a fresh interpreter (no compile cache carries over)."""
    script = MEASURE.format(import_line=import_line, tree=tree, n=n, name=name)
    return last_json(run_python(python, script))


def add_arguments(parser):
    parser.add_argument("--sizes", default="8,32,128,256")
    parser.add_argument("--trees", default="", help="also these named trees, e.g. resnet50")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--reference-python", default=None, help="default: .refenv/bin/python")
    parser.add_argument("--rounds", type=int, default=1, help="keep each row's fastest")


def run(args):
    if args.quick:
        args.sizes, args.trees, args.optimizers, args.rounds = "8", "", "quad", 1
    ref_python = reference_python(args.reference_python)
    cases = [("mixed", int(n)) for n in args.sizes.split(",")]
    cases += [
        (t, len(jax.tree.leaves(TREES[t]()["params"], is_leaf=lambda x: isinstance(x, tuple))))
        for t in args.trees.split(",")
        if t
    ]
    rows = {}
    # Ours then the reference's, case by case, so both see the same machine load; with
    # `--rounds` > 1 the whole sequence repeats and each row keeps its fastest compile.
    for _ in range(args.rounds):
        for tree, n in cases:
            for name in args.optimizers.split(","):
                row = rows.setdefault(
                    (tree, n, name), {"tree": tree, "leaves": n, "optimizer": name}
                )
                who = [("ours", sys.executable, OURS)]
                if ref_python:
                    who.append(("reference", ref_python, REFERENCE))
                for key, python, line in who:
                    new = measure(python, line, tree, n, name)
                    old = row.get(key)
                    if (
                        old is None
                        or new["lower_s"] + new["compile_s"] < old["lower_s"] + old["compile_s"]
                    ):
                        row[key] = new
                print(json.dumps(row), file=sys.stderr, flush=True)
    rows = list(rows.values())
    where = environment()
    meta = {
        "date": where["date"],
        "cpus": os.cpu_count(),
        "jax": where["jax"],
        "backend": where["backend"],
        "device": where["device"],
    }
    text = table(rows)
    print(text)
    write_results(
        args, {"meta": meta, "rows": rows}, text, title="Compile time against the number of leaves"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| tree | leaves | optimizer | lower+compile s | vs smallest | temp MB "
        "| ref lower+compile s | ref vs smallest | ours / ref compile | ours / ref temp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = lambda m: m["lower_s"] + m["compile_s"]
    base = {}
    for row in rows:
        if row["tree"] == "mixed":
            base.setdefault(row["optimizer"], row)
    for row in rows:
        o, r = row["ours"], row.get("reference")
        b = base.get(row["optimizer"]) if row["tree"] == "mixed" else None
        growth = f"{total(o) / total(b['ours']):.2f}" if b else ""
        ref_growth = f"{total(r) / total(b['reference']):.2f}" if (b and r) else ""
        lines.append(
            f"| {row['tree']} | {row['leaves']} | {row['optimizer']} | {total(o):.1f} | {growth} | "
            f"{o['temp_bytes'] / 1e6:.1f} | "
            + (
                f"{total(r):.1f} | {ref_growth} | {total(o) / total(r):.2f} | "
                f"{o['temp_bytes'] / max(r['temp_bytes'], 1):.2f} |"
                if r
                else "| | | |"
            )
        )
    return "\n".join(lines)
