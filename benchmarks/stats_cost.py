"""What `preconditioner_stats` adds to a jitted training step.

`wk.quad` (float32) on an MLP 784-512-512-10 (block size 256: 14 dense tiles of up to
256 x 256 and three 1-D leaves). Four programs, each jitted whole: the update alone,
the update returning the default statistics of its new state, the same with
`condition_numbers=True`, and the statistics alone (both modes). All are timed on warm
calls from a state that has taken a few steps, in turn, round after round; the reported
time is the fastest of `--repeats` calls (other load on a shared machine only ever adds
time), the median is kept beside it. `--quick`: 2 repeats.

    python -m benchmarks stats_cost [--repeats 30]
"""

import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import wkron_eqx as wk

from ._harness import interleaved, write_results


DESCRIPTION = "what preconditioner_stats adds to a jitted training step"
SIZES = (784, 512, 512, 10)
WARMUP = 3


def _tree(rng: np.random.Generator, scale: bool) -> dict[str, jax.Array]:
    tree = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        w = rng.standard_normal((a, b)) / (np.sqrt(a) if scale else 1.0)
        tree[f"w{i}"] = jnp.asarray(w, jnp.float32)
        tree[f"b{i}"] = jnp.asarray(rng.standard_normal(b) * (0.0 if scale else 1.0), jnp.float32)
    return tree


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=30)


def run(args) -> None:
    repeats = 2 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    params, grads = _tree(rng, scale=True), _tree(rng, scale=False)
    tx = wk.quad(dtype=jnp.float32)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(5):  # factors away from the identity
        _, state = update(grads, state, params)

    def step(condition_numbers: bool | None):
        def run(grads, state, params):
            updates, state = tx.update(grads, state, params)
            if condition_numbers is None:
                return updates, state
            stats = wk.preconditioner_stats(state, condition_numbers=condition_numbers)
            return updates, state, stats

        return run

    def stats_only(condition_numbers: bool):
        return lambda state: wk.preconditioner_stats(state, condition_numbers=condition_numbers)

    programs = {
        "update": (step(None), (grads, state, params)),
        "update + stats": (step(False), (grads, state, params)),
        "update + stats(condition_numbers=True)": (step(True), (grads, state, params)),
        "stats alone": (stats_only(False), (state,)),
        "stats(condition_numbers=True) alone": (stats_only(True), (state,)),
    }
    calls = {}
    for name, (fn, inputs) in programs.items():
        compiled = jax.jit(fn).lower(*inputs).compile()
        calls[name] = lambda compiled=compiled, inputs=inputs: compiled(*inputs)
    rows = []
    for name, times in interleaved(calls, repeats, warmup=WARMUP).items():
        fastest, median = min(times), statistics.median(times)
        rows.append({"program": name, "step_ms": fastest, "median_ms": median})
        print(f"{name:>40}: {fastest:8.2f} ms (median {median:.2f})", flush=True)
    base = rows[0]["step_ms"]
    for row in rows:
        row["ratio"] = row["step_ms"] / base
    _write(args, rows, repeats)


def _write(args, rows: list[dict], repeats: int) -> None:
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "repeats": repeats,
    }
    notes = (
        "`wk.quad(dtype=jnp.float32)` on an MLP 784-512-512-10 (14 dense tiles of up to\n"
        f"256 x 256, three 1-D leaves). Fastest of {repeats} warm calls (the median beside\n"
        "it); the ratio is to the update alone. On a shared machine the programs with an SVD\n"
        "vary most from run to run (other load stretches their long calls); the fastest call\n"
        "is the closest to their unloaded cost."
    )
    lines = ["| program | ms | median ms | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {r['program']} | {r['step_ms']:.2f} | {r['median_ms']:.2f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    title = "`preconditioner_stats` inside a jitted step"
    write_results(args, {"meta": meta, "rows": rows}, "\n".join(lines), title=title, notes=notes)
