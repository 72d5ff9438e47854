"""Step time, compile time and state memory: wkron_eqx against optax.adamw and eformer.

    python -m benchmarks step [--reference-python .refenv/bin/python] [--trees mlp,gpt]
    python -m benchmarks step --trees transformer12,resnet50 --results-name step_many

Prints a markdown table and writes `benchmarks/results/step.{json,md}`. Every ratio is
measured in this one run on this machine. The reference (eformer 0.0.101's `quad` /
`skew`) runs in its own virtual environment (`benchmarks/setup_reference.sh`), in a
subprocess, on the same trees with the same keyword arguments. Tree by tree, ours then
the reference's, so that both see the same machine load; the whole sequence `--rounds`
times, keeping each row's fastest times. `--quick`: the MLP, quad in float32, 3 repeats,
one round.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wkron_eqx as wk
from wkron_eqx._layout import LeafKind, plan_tree

from ._harness import (
    TREES,
    broadcast_scanned,
    environment,
    keep_fastest,
    last_json,
    materialise,
    measure,
    reference_python,
    run_python,
    write_results,
)


DESCRIPTION = "step time, compile time and state memory against optax.adamw and the reference"
OPTIMIZERS = ("quad", "skew")
DTYPES = ("float32", "bfloat16")
DEFAULT_TREES = ("mlp", "gpt", "conv", "embedding")

REFERENCE_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from benchmarks._harness import TREES, broadcast_scanned, materialise, measure
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


def run_ours(trees, optimizers, dtypes, repeats: int, probability: bool) -> dict:
    out = {}
    for tree in trees:
        spec = TREES[tree]()
        params = jax.tree.map(jnp.asarray, materialise(spec["params"], 0))
        grads = jax.tree.map(jnp.asarray, materialise(spec["params"], 1))
        scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
        out[f"{tree}/adamw/float32"] = measure(optax.adamw(1e-3), params, grads, repeats)
        for name in optimizers:
            for dtype in dtypes:
                tx = getattr(wk, name)(
                    learning_rate=1e-3, dtype=getattr(jnp, dtype), scanned_layers=scanned
                )
                row = measure(tx, params, grads, repeats)
                row["matmul_ms"] = matmul_floor(
                    spec, params, scanned, getattr(jnp, dtype), name, repeats
                )
                out[f"{tree}/{name}/{dtype}"] = row
                print(tree, name, dtype, row, file=sys.stderr, flush=True)
        if probability:
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


def run_reference(python: str, trees, optimizers, dtypes, repeats: int) -> dict:
    script = REFERENCE_SCRIPT.format(
        trees=list(trees), optimizers=list(optimizers), dtypes=list(dtypes), repeats=repeats
    )
    return last_json(run_python(python, script))


def table(ours: dict, ref: dict, trees, optimizers, dtypes) -> str:
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
        for name in optimizers:
            for dtype in dtypes:
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


def add_arguments(parser):
    parser.add_argument("--reference-python", default=None, help="default: .refenv/bin/python")
    parser.add_argument(
        "--trees", default=",".join(DEFAULT_TREES), help=f"any of {', '.join(TREES)}"
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-update-probability",
        action="store_true",
        help="leave out the 100-step means at preconditioner_update_probability 0.1 and 1.0",
    )


def run(args):
    if args.quick:
        args.trees, args.optimizers, args.dtypes = "mlp", "quad", "float32"
        args.repeats, args.rounds, args.no_update_probability = 3, 1, True
    trees = args.trees.split(",")
    optimizers, dtypes = args.optimizers.split(","), args.dtypes.split(",")
    device = jax.devices()[0]
    print(f"running on {device.device_kind} ({jax.default_backend()})", file=sys.stderr)
    ref_python = reference_python(args.reference_python)
    probability = not args.no_update_probability
    ours, ref = {}, {}
    for _ in range(args.rounds):
        for tree in trees:
            rows = run_ours([tree], optimizers, dtypes, args.repeats, probability)
            keep_fastest(ours, rows, _TIMES)
            if ref_python:
                rows = run_reference(ref_python, [tree], optimizers, dtypes, args.repeats)
                keep_fastest(ref, rows, _TIMES)
    meta = environment()
    text = table(ours, ref, trees, optimizers, dtypes)
    print(text)
    write_results(
        args,
        {"meta": meta, "ours": ours, "reference": ref},
        text,
        title="One optimizer update against optax.adamw and eformer 0.0.101",
    )
