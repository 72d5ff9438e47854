"""Convergence: loss vs step and vs wall time, wkron_eqx against optax.adamw and eformer.

    python -m benchmarks converge [--reference-python .refenv/bin/python]
    python -m benchmarks converge --memory-modes
    python -m benchmarks converge --damping 5e-3

The second form runs quad and skew under each `memory_save_mode` instead (no adamw, no
reference) and writes `benchmarks/results/converge_memory_modes.json`; the third, without
and with that `damping` (`converge_damping.json`).

Two problems: an MLP (64-128-128-10) on scikit-learn's bundled digits (minibatches of
128, a fixed sequence) and a least-squares problem `0.5 ||A W B - C||^2` whose Hessian
`B B^T (x) A^T A` has condition number 1e4 (cosine-decayed learning rate; five random
instances, reported as the geometric mean of their losses, since one instance's final loss
varies by about 1.3x with its draw). Every optimizer
runs on its own small learning-rate grid and the best point is reported (float32,
weight_decay 0, other arguments at their defaults). Prints markdown tables; writes
`benchmarks/results/converge.{json,md}` and `converge.png`. `--quick`: 40 digits steps,
100 least-squares steps on one instance, one learning rate per optimizer.
"""

import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

import wkron_eqx as wk

from ._converge_core import least_squares_problems, run_digits, run_least_squares_problems
from ._harness import last_json, reference_python, run_python, write_results


DESCRIPTION = "loss against steps on digits and an ill-conditioned least squares, best lr each"


class Sizes(NamedTuple):
    digits_steps: int
    digits_eval: int
    ls_steps: int
    ls_eval: int
    ls_problems: int
    grids: dict


GRIDS = {
    "digits": {"adamw": [1e-3, 3e-3, 1e-2], "quad": [1e-3, 3e-3, 1e-2], "skew": [1e-3, 3e-3, 1e-2]},
    "lsq": {
        "adamw": [1e-2, 3e-2, 1e-1, 3e-1],
        "quad": [1e-2, 3e-2, 1e-1, 3e-1],
        "skew": [1e-2, 3e-2, 1e-1, 3e-1],
    },
}
TARGET_LOSS = 0.01
FULL = Sizes(600, 20, 1000, 50, 5, GRIDS)
QUICK = Sizes(
    40, 20, 100, 50, 1, {p: {n: g[-2:-1] for n, g in grid.items()} for p, grid in GRIDS.items()}
)

REFERENCE_SCRIPT = r"""
import json
import numpy as np, jax.numpy as jnp, optax
from benchmarks._converge_core import run_digits, run_least_squares_problems
from eformer.optimizers._tx import white_kron as ref
data = dict(np.load({data!r}))
problem = dict(np.load({problem!r}))
grids = {grids!r}
out = {{}}
for name in ("quad", "skew"):
    for lr in grids["digits"][name]:
        tx = getattr(ref, name)(learning_rate=lr, weight_decay=0.0, dtype=jnp.float32)
        out[f"digits/{{name}}/{{lr}}"] = run_digits(tx, data, {ds}, {de})
    for lr in grids["lsq"][name]:
        schedule = optax.cosine_decay_schedule(lr, {ls})
        tx = getattr(ref, name)(learning_rate=schedule, weight_decay=0.0, dtype=jnp.float32)
        out[f"lsq/{{name}}/{{lr}}"] = run_least_squares_problems(tx, problem, {ls}, {le})
print(json.dumps(out))
"""


def digits_data(steps: int) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    rng = np.random.default_rng(0)
    batches = np.stack([rng.choice(len(x_train), 128, replace=False) for _ in range(steps)])
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "batches": batches.astype(np.int32),
    }


def ours(name: str, lr, **options):
    if name == "adamw":
        return optax.adamw(lr, weight_decay=0.0)
    return getattr(wk, name)(learning_rate=lr, weight_decay=0.0, dtype=jnp.float32, **options)


def compare_options(args, sizes: Sizes, variants: dict[str, dict], name: str) -> None:
    """Both problems for quad and skew under each variant's options, best lr each."""
    data, problem = digits_data(sizes.digits_steps), least_squares_problems(sizes.ls_problems)
    results = {}
    for variant, options in variants.items():
        for rule in ("quad", "skew"):
            key = f"{rule}, {variant}"
            for lr in sizes.grids["digits"][rule]:
                tx = ours(rule, lr, **options)
                results[f"digits/ours/{key}/{lr}"] = run_digits(
                    tx, data, sizes.digits_steps, sizes.digits_eval
                )
            for lr in sizes.grids["lsq"][rule]:
                tx = ours(rule, optax.cosine_decay_schedule(lr, sizes.ls_steps), **options)
                results[f"lsq/ours/{key}/{lr}"] = run_least_squares_problems(
                    tx, problem, sizes.ls_steps, sizes.ls_eval
                )
            print("done", key, file=sys.stderr, flush=True)
    best = summarise(results)
    lines = [
        "| optimizer, options | digits: lr | steps to loss 0.01 | final loss | test acc "
        f"| least squares: lr | final loss (geometric mean of {sizes.ls_problems}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys(k.split("/")[2] for k in best):
        d, q = best[f"digits/ours/{key}"], best[f"lsq/ours/{key}"]
        hit = steps_to(d["curve"], sizes.digits_eval, TARGET_LOSS)
        lines.append(
            f"| {key} | {d['lr']:g} | {hit if hit is not None else f'>{sizes.digits_steps}'} "
            f"| {d['final_loss']:.4f} | {100 * d['test_accuracy']:.2f}% | {q['lr']:g} "
            f"| {q['final_loss']:.3e} |"
        )
    text = "\n".join(lines)
    print(text)
    write_results(args, best, text, title="Convergence per option", name=name)


def steps_to(curve, every, target):
    for i, loss in enumerate(curve):
        if loss <= target:
            return i * every
    return None


def summarise(results: dict) -> dict:
    best = {}
    for key, r in results.items():
        problem, impl, name, lr = key.split("/")
        final = r["curve"][-1]
        k = f"{problem}/{impl}/{name}"
        if k not in best or final < best[k]["final_loss"]:
            best[k] = {"lr": float(lr), "final_loss": final, **r}
    return best


def add_arguments(parser):
    parser.add_argument("--reference-python", default=None, help="default: .refenv/bin/python")
    parser.add_argument("--memory-modes", action="store_true")
    parser.add_argument("--damping", type=float, default=None)


def run(args):
    sizes = QUICK if args.quick else FULL
    if args.memory_modes:
        modes = {str(m): dict(memory_save_mode=m) for m in (None, "one_diag", "all_diag")}
        return compare_options(args, sizes, modes, "converge_memory_modes")
    if args.damping is not None:
        variants = {"damping=0": {}, f"damping={args.damping:g}": dict(damping=args.damping)}
        return compare_options(args, sizes, variants, "converge_damping")
    data = digits_data(sizes.digits_steps)
    problem = least_squares_problems(sizes.ls_problems)
    results = {}
    for name in ("adamw", "quad", "skew"):
        for lr in sizes.grids["digits"][name]:
            results[f"digits/ours/{name}/{lr}"] = run_digits(
                ours(name, lr), data, sizes.digits_steps, sizes.digits_eval
            )
        for lr in sizes.grids["lsq"][name]:
            schedule = optax.cosine_decay_schedule(lr, sizes.ls_steps)
            results[f"lsq/ours/{name}/{lr}"] = run_least_squares_problems(
                ours(name, schedule), problem, sizes.ls_steps, sizes.ls_eval
            )
        print("done", name, file=sys.stderr, flush=True)
    ref_python = reference_python(args.reference_python)
    if ref_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "data.npz", **data)
            np.savez(Path(tmp) / "problem.npz", **problem)
            script = REFERENCE_SCRIPT.format(
                data=str(Path(tmp) / "data.npz"),
                problem=str(Path(tmp) / "problem.npz"),
                grids=sizes.grids,
                ds=sizes.digits_steps,
                de=sizes.digits_eval,
                ls=sizes.ls_steps,
                le=sizes.ls_eval,
            )
            for key, r in last_json(run_python(ref_python, script)).items():
                problem_name, name, lr = key.split("/")
                results[f"{problem_name}/eformer/{name}/{lr}"] = r
    best = summarise(results)
    text = tables(best, sizes)
    print(text)
    folder = write_results(args, best, text, title="Convergence")
    plot(best, sizes, folder / "converge.png")
    return best


def tables(best: dict, sizes: Sizes) -> str:
    lines = [
        "digits MLP, best learning rate per optimizer:",
        "",
        "| optimizer | lr | steps to train loss 0.01 | final train loss | test acc | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for k, b in best.items():
        if k.startswith("digits/"):
            _, impl, name = k.split("/")
            hit = steps_to(b["curve"], sizes.digits_eval, TARGET_LOSS)
            hit = hit if hit is not None else f">{sizes.digits_steps}"
            lines.append(
                f"| {impl} {name} | {b['lr']:g} | {hit} "
                f"| {b['final_loss']:.4f} | {100 * b['test_accuracy']:.2f}% "
                f"| {1e3 * b['seconds_per_step']:.2f} |"
            )
    at = min(200, sizes.ls_steps)
    lines += [
        "",
        "least squares, condition number 1e4, best learning rate per optimizer:",
        "",
        f"geometric mean over {sizes.ls_problems} random instances; the last columns are the "
        "final loss over the reference's, as geometric mean and per-instance range",
        "",
        f"| optimizer | lr | loss at step {at} | final loss (step {sizes.ls_steps}) "
        "| per instance | vs reference | per instance vs reference | ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, b in best.items():
        if k.startswith("lsq/"):
            _, impl, name = k.split("/")
            per = np.asarray(b["final_per_problem"])
            ref = best.get(f"lsq/eformer/{name}")
            vs = vs_range = ""
            if ref is not None and impl == "ours":
                ratios = per / np.asarray(ref["final_per_problem"])
                vs = f"{b['final_loss'] / ref['final_loss']:.2f}"
                vs_range = f"{ratios.min():.2f}-{ratios.max():.2f}"
            lines.append(
                f"| {impl} {name} | {b['lr']:g} | {b['curve'][at // sizes.ls_eval]:.3e} "
                f"| {b['final_loss']:.3e} | {per.min():.2e}-{per.max():.2e} | {vs} "
                f"| {vs_range} | {1e3 * b['seconds_per_step']:.2f} |"
            )
    return "\n".join(lines)


def plot(best: dict, sizes: Sizes, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, problem_name, every, title in (
        (axes[0], "digits", sizes.digits_eval, "digits MLP: full training loss"),
        (axes[1], "lsq", sizes.ls_eval, "least squares (cond 1e4)"),
    ):
        for k, b in best.items():
            if k.startswith(problem_name + "/"):
                _, impl, name = k.split("/")
                impl = "optax" if name == "adamw" else impl  # adamw is optax's, not ours
                steps = np.arange(len(b["curve"])) * every
                ax.semilogy(steps, b["curve"], label=f"{impl} {name} (lr {b['lr']:g})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
