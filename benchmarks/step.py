"""Step time, compile time and state memory: wkron_eqx against optax.adamw and eformer.

    python benchmarks/step.py [--reference-python .refenv/bin/python] [--trees mlp,gpt]

Prints a markdown table and writes `benchmarks/results/step.json`. Every ratio is
measured in this one run on this machine. The reference (eformer 0.0.101's `quad` /
`skew`) runs in its own virtual environment (`benchmarks/setup_reference.sh`), in a
subprocess, on the same trees with the same keyword arguments.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _measure import measure
from _trees import TREES, broadcast_scanned, materialise

import wkron_eqx as wk
from wkron_eqx._layout import LeafKind, plan_tree


OPTIMIZERS = ["quad", "skew"]
DTYPES = ["float32", "bfloat16"]
DEFAULT_TREES = ("mlp", "gpt", "conv", "embedding")

REFERENCE_SCRIPT = r"""
import json, sys
sys.path.insert(0, {here!r})
import jax, jax.numpy as jnp
from _measure import measure
from _trees import TREES, broadcast_scanned, materialise
from eformer.optimizers._tx import white_kron as ref

out = {{}}
for tree in {trees!r}:
    spec = TREES[tree]()
    params = jax.tree.map(jnp.asarray, materialise(spec["params"], 0))
    grads = jax.tree.map(jnp.asarray, materialise(spec["params"], 1))
    scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
    for name in {optimizers!r}:
        for dtype in {dtypes!r}:
            tx = getattr(ref, name)(
                learning_rate=1e-3, dtype=getattr(jnp, dtype), scanned_layers=scanned
            )
            key = f"{{tree}}/{{name}}/{{dtype}}"
            out[key] = measure(tx, params, grads, repeats={repeats})
            print(key, out[key], file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def matmul_floor(spec: dict, params, scanned, dtype, rule: str, repeats: int) -> float:
    """Median time (ms) of the batched matmuls of one of our steps, and nothing else."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(scanned) if scanned is not None else [False] * len(leaves)
    grouping = wk.Backend.of().grouping
    plan = plan_tree(tuple(x.shape for x in leaves), tuple(flags), 256, 16384, 1, grouping)
    rng = np.random.default_rng(0)
    stacks = []  # (G, Ql or None, Qr or None)
    for group in plan.groups:  # the batched computations, as the step runs them
        t = sum(plan.buckets[m.bucket].stack for m in group.members)
        r, c = group.rows, group.cols
        stacks.append(((t, r, c), (t, r, r), (t, c, c)))
    for p in plan.leaves:
        layout = p.layout
        if p.kind != LeafKind.LARGE or layout.diag_left == layout.diag_right:
            continue
        (m, n), w, stack = p.merged, layout.strip_side, layout.stack
        if layout.diag_left:
            stacks.append(((stack, m, w), None, (stack, w, w)))
        else:
            stacks.append(((stack, w, n), (stack, w, w), None))
    arrays = [
        tuple(None if s is None else jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
        for shapes in stacks
    ]
    extra = 3 if rule == "skew" else 2  # factor-update matmuls per dense side
    # QUAD keeps its factors symmetric (`Q^T` is `Q`); Procrustes needs the transpose.
    T = (lambda Q: Q) if rule == "quad" else (lambda Q: jnp.swapaxes(Q, 1, 2))

    # `P X` and `X P` with `P = Q^T Q`, in the cheaper order for the shapes (as the step).
    def left(Q, X):
        return T(Q) @ (Q @ X) if X.shape[2] < X.shape[1] else (T(Q) @ Q) @ X

    def right(X, Q):
        return (X @ T(Q)) @ Q if X.shape[1] < X.shape[2] else X @ (T(Q) @ Q)

    def update(Q, A):
        for _ in range(extra):
            Q = A @ Q
        return Q

    @jax.jit
    def floor(arrays):
        outs = []
        for G, Ql, Qr in arrays:
            X = G if Ql is None else left(Ql, G)
            X = X if Qr is None else right(X, Qr)
            if Ql is not None:
                Ql = update(Ql, X @ jnp.swapaxes(X, 1, 2))
                G = left(Ql, G)  # the output uses the NEW factors
                outs.append(Ql)
            if Qr is not None:
                Qr = update(Qr, jnp.swapaxes(X, 1, 2) @ X)
                G = right(G, Qr)
                outs.append(Qr)
            outs.append(G)
        return outs

    compiled = floor.lower(arrays).compile()
    jax.block_until_ready(compiled(arrays))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(arrays))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.min(times))  # the fastest, like `measure`'s step time


def run_ours(trees, repeats: int) -> dict:
    out = {}
    for tree in trees:
        spec = TREES[tree]()
        params = jax.tree.map(jnp.asarray, materialise(spec["params"], 0))
        grads = jax.tree.map(jnp.asarray, materialise(spec["params"], 1))
        scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
        out[f"{tree}/adamw/float32"] = measure(optax.adamw(1e-3), params, grads, repeats)
        for name in OPTIMIZERS:
            for dtype in DTYPES:
                tx = getattr(wk, name)(
                    learning_rate=1e-3, dtype=getattr(jnp, dtype), scanned_layers=scanned
                )
                row = measure(tx, params, grads, repeats)
                row["matmul_ms"] = matmul_floor(
                    spec, params, scanned, getattr(jnp, dtype), name, repeats
                )
                out[f"{tree}/{name}/{dtype}"] = row
                print(tree, name, dtype, row, file=sys.stderr, flush=True)
        if "pup" in os.environ.get("BENCH_EXTRA", "pup"):
            out.update(update_probability(tree, params, grads, scanned))
    return out


def update_probability(tree: str, params, grads, scanned, rounds: int = 2) -> dict:
    """Mean step time over 100 consecutive steps with `preconditioner_update_probability`
    0.1 and 1.0, measured alternately; each is the best of `rounds` such means."""
    runs = {}
    for p in (0.1, 1.0):
        tx = wk.quad(
            learning_rate=1e-3,
            dtype=jnp.float32,
            scanned_layers=scanned,
            preconditioner_update_probability=p,
        )
        update = jax.jit(tx.update)
        state = tx.init(params)
        jax.block_until_ready(update(grads, state, params))
        runs[p] = (update, state, [])
    for _ in range(rounds):
        for update, state, means in runs.values():
            start = time.perf_counter()
            for _ in range(100):
                u, state = update(grads, state, params)
            jax.block_until_ready((u, state))
            means.append(1e3 * (time.perf_counter() - start) / 100)
    return {
        f"{tree}/quad-p0.1/float32": {"step_ms": min(runs[0.1][2])},
        f"{tree}/quad-p1.0/float32": {"step_ms": min(runs[1.0][2])},
    }


def run_reference(python: str, trees, repeats: int) -> dict:
    script = REFERENCE_SCRIPT.format(
        here=str(HERE), trees=list(trees), optimizers=OPTIMIZERS, dtypes=DTYPES, repeats=repeats
    )
    proc = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, env=os.environ.copy()
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError("the reference run failed")
    return {f"{k}": v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def table(ours: dict, ref: dict, trees) -> str:
    lines = [
        "| tree | optimizer | dtype | step ms | vs adamw | vs reference | vs own matmuls "
        "| compile s | vs ref compile | temp MB | vs ref temp | state/params | ref state/params "
        "| GFLOP/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tree in trees:
        adam = ours[f"{tree}/adamw/float32"]
        lines.append(
            f"| {tree} | adamw | float32 | {adam['step_ms']:.2f} | 1.00 | | | "
            f"{adam['compile_s']:.2f} | | {adam['temp_bytes'] / 1e6:.1f} | | "
            f"{adam['state_bytes'] / adam['param_bytes']:.2f} | | |"
        )
        for name in OPTIMIZERS:
            for dtype in DTYPES:
                key = f"{tree}/{name}/{dtype}"
                row, r = ours[key], ref.get(key)
                fmt = lambda x: f"{x:.2f}" if x is not None else "n/a"
                vs_ref = row["step_ms"] / r["step_ms"] if r else None
                vs_ref_c = row["compile_s"] / r["compile_s"] if r else None
                ref_mem = r["state_bytes"] / r["param_bytes"] if r else None
                vs_ref_t = row["temp_bytes"] / max(r["temp_bytes"], 1) if r else None
                lines.append(
                    f"| {tree} | {name} | {dtype} | {row['step_ms']:.2f} | "
                    f"{row['step_ms'] / adam['step_ms']:.1f} | {fmt(vs_ref)} | "
                    f"{row['step_ms'] / row['matmul_ms']:.2f} | {row['compile_s']:.2f} | "
                    f"{fmt(vs_ref_c)} | {row['temp_bytes'] / 1e6:.1f} | {fmt(vs_ref_t)} | "
                    f"{row['state_bytes'] / row['param_bytes']:.2f} | "
                    f"{fmt(ref_mem)} | {row['flops'] / 1e9:.3f} |"
                )
        pup = ours.get(f"{tree}/quad-p0.1/float32")
        if pup:
            every = ours[f"{tree}/quad-p1.0/float32"]["step_ms"]
            lines.append(
                f"| {tree} | quad p=0.1 (100-step mean) | float32 | {pup['step_ms']:.2f} | "
                f"{pup['step_ms'] / adam['step_ms']:.1f} | | "
                f"{pup['step_ms'] / every:.2f} x every-step | | | | | | | |"
            )
    return "\n".join(lines)


_TIMES = ("step_ms", "median_ms", "compile_s", "matmul_ms")


def keep_fastest(into: dict, rows: dict) -> None:
    """Merge `rows` into `into`, keeping the smaller value of each time field."""
    for key, row in rows.items():
        if key in into:
            for field in _TIMES:
                if field in row:
                    row[field] = min(row[field], into[key][field])
        into[key] = row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-python", default=None)
    parser.add_argument(
        "--trees", default=",".join(DEFAULT_TREES), help=f"any of {', '.join(TREES)}"
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = args.trees.split(",")
    OPTIMIZERS[:] = args.optimizers.split(",")
    DTYPES[:] = args.dtypes.split(",")
    device = jax.devices()[0]
    print(f"running on {device.device_kind} ({jax.default_backend()})", file=sys.stderr)
    default_ref = HERE.parent / ".refenv" / "bin" / "python"
    ref_python = args.reference_python or (str(default_ref) if default_ref.exists() else None)
    # Tree by tree, ours then the reference's, so that both see the same machine load;
    # the whole sequence `--rounds` times, keeping each row's fastest times, so that a
    # burst of load on this shared machine during one measurement does not decide a ratio.
    ours, ref = {}, {}
    for _ in range(args.rounds):
        for tree in trees:
            keep_fastest(ours, run_ours([tree], args.repeats))
            if ref_python:
                keep_fastest(ref, run_reference(ref_python, [tree], args.repeats))
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    }
    (HERE / "results").mkdir(exist_ok=True)
    suffix = os.environ.get("BENCH_SUFFIX", "")
    (HERE / "results" / f"step{suffix}.json").write_text(
        json.dumps({"meta": meta, "ours": ours, "reference": ref}, indent=1)
    )
    print(
        f"{meta['date']}, {meta['device']} ({meta['backend']}), {meta['machine']}, "
        f"jax {meta['jax']}\n"
    )
    print(table(ours, ref, trees))


if __name__ == "__main__":
    main()
