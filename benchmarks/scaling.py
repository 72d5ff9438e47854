"""Compile time and XLA temp memory against the number of leaves: ours and the reference.

    python benchmarks/scaling.py [--sizes 8,32,128,256] [--reference-python .refenv/bin/python]

A tree of N leaves cycles through matrices, vectors and conv kernels (`_trees.mixed`);
for each N, `jax.jit(tx.update).lower(...)` and `.compile()` are timed with cold caches,
ours then the reference's (eformer 0.0.101, in its own virtual environment), `quad`
and `skew`, float32. Shapes only: nothing is run, so the numbers are compile costs.
Writes `benchmarks/results/scaling.json` and prints a markdown table with the growth
from the smallest N and the ratio to the reference.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax
from _trees import TREES


OPTIMIZERS = ("quad", "skew")

# Run in both interpreters: builds the abstract tree and measures one optimizer.
MEASURE = r"""
import json, sys
sys.path.insert(0, {here!r})
import jax, jax.numpy as jnp
from _measure import compile_only
from _trees import TREES, broadcast_scanned, mixed
{import_line}
spec = mixed({n}) if {tree!r} == "mixed" else TREES[{tree!r}]()
def build(node):
    if isinstance(node, tuple):
        return jax.ShapeDtypeStruct(node, jnp.float32)
    return {{k: build(v) for k, v in node.items()}}
params = build(spec["params"])
scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
tx = getattr(opt, {name!r})(learning_rate=1e-3, dtype=jnp.float32, scanned_layers=scanned)
print(json.dumps(compile_only(tx, params, params)))
"""

OURS = "import wkron_eqx as opt"
REFERENCE = "from eformer.optimizers._tx import white_kron as opt"


def run(python: str, import_line: str, tree: str, n: int, name: str) -> dict:
    """One measurement in a fresh interpreter (no compile cache carries over)."""
    script = MEASURE.format(here=str(HERE), import_line=import_line, tree=tree, n=n, name=name)
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{tree} n={n} {name} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="8,32,128,256")
    parser.add_argument("--trees", default="", help="also these named trees, e.g. resnet50")
    parser.add_argument("--reference-python", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="keep each row's fastest")
    args = parser.parse_args()
    default_ref = HERE.parent / ".refenv" / "bin" / "python"
    ref_python = args.reference_python or (str(default_ref) if default_ref.exists() else None)
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
            for name in OPTIMIZERS:
                row = rows.setdefault(
                    (tree, n, name), {"tree": tree, "leaves": n, "optimizer": name}
                )
                who = [("ours", sys.executable, OURS)]
                if ref_python:
                    who.append(("reference", ref_python, REFERENCE))
                for key, python, line in who:
                    new = run(python, line, tree, n, name)
                    old = row.get(key)
                    if (
                        old is None
                        or new["lower_s"] + new["compile_s"] < old["lower_s"] + old["compile_s"]
                    ):
                        row[key] = new
                print(json.dumps(row), file=sys.stderr, flush=True)
    rows = list(rows.values())
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scaling.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    where = f"{meta['device']} ({meta['backend']}), {meta['cpus']} CPUs"
    print(f"{meta['date']}, {where}, jax {meta['jax']}\n")
    print(table(rows))


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


if __name__ == "__main__":
    main()
