"""Convergence: loss vs step and vs wall time, wkron_eqx against optax.adamw and eformer.

    python benchmarks/converge.py [--reference-python .refenv/bin/python]
    python benchmarks/converge.py --memory-modes
    python benchmarks/converge.py --damping 5e-3

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
`benchmarks/results/converge.json` and `converge.png`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax.numpy as jnp
import numpy as np
import optax
from _converge_core import least_squares_problems, run_digits, run_least_squares_problems

import wkron_eqx as wk


DIGITS_STEPS, DIGITS_EVAL = 600, 20
LS_STEPS, LS_EVAL, LS_PROBLEMS = 1000, 50, 5
GRIDS = {
    "digits": {"adamw": [1e-3, 3e-3, 1e-2], "quad": [1e-3, 3e-3, 1e-2], "skew": [1e-3, 3e-3, 1e-2]},
    "lsq": {
        "adamw": [1e-2, 3e-2, 1e-1, 3e-1],
        "quad": [1e-2, 3e-2, 1e-1, 3e-1],
        "skew": [1e-2, 3e-2, 1e-1, 3e-1],
    },
}
TARGET_LOSS = 0.01

REFERENCE_SCRIPT = r"""
import json, sys
sys.path.insert(0, {here!r})
import numpy as np, jax.numpy as jnp, optax
from _converge_core import run_digits, run_least_squares_problems
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


def digits_data() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    rng = np.random.default_rng(0)
    batches = np.stack([rng.choice(len(x_train), 128, replace=False) for _ in range(DIGITS_STEPS)])
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


def compare_options(variants: dict[str, dict], out: str) -> None:
    """Both problems for quad and skew under each variant's options, best lr each."""
    data, problem = digits_data(), least_squares_problems(LS_PROBLEMS)
    results = {}
    for variant, options in variants.items():
        for name in ("quad", "skew"):
            key = f"{name}, {variant}"
            for lr in GRIDS["digits"][name]:
                tx = ours(name, lr, **options)
                results[f"digits/ours/{key}/{lr}"] = run_digits(tx, data, DIGITS_STEPS, DIGITS_EVAL)
            for lr in GRIDS["lsq"][name]:
                tx = ours(name, optax.cosine_decay_schedule(lr, LS_STEPS), **options)
                results[f"lsq/ours/{key}/{lr}"] = run_least_squares_problems(
                    tx, problem, LS_STEPS, LS_EVAL
                )
            print("done", key, file=sys.stderr, flush=True)
    best = summarise(results)
    print(
        "| optimizer, options | digits: lr | steps to loss 0.01 | final loss | test acc "
        "| least squares: lr | final loss (geometric mean of 5) |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in dict.fromkeys(k.split("/")[2] for k in best):
        d, q = best[f"digits/ours/{key}"], best[f"lsq/ours/{key}"]
        hit = steps_to(d["curve"], DIGITS_EVAL, TARGET_LOSS)
        print(
            f"| {key} | {d['lr']:g} | {hit if hit is not None else f'>{DIGITS_STEPS}'} "
            f"| {d['final_loss']:.4f} | {100 * d['test_accuracy']:.2f}% | {q['lr']:g} "
            f"| {q['final_loss']:.3e} |"
        )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / out).write_text(json.dumps(best, indent=1))


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-python", default=str(HERE.parent / ".refenv/bin/python"))
    parser.add_argument("--memory-modes", action="store_true")
    parser.add_argument("--damping", type=float, default=None)
    args = parser.parse_args(argv)
    if args.memory_modes:
        modes = {str(m): dict(memory_save_mode=m) for m in (None, "one_diag", "all_diag")}
        return compare_options(modes, "converge_memory_modes.json")
    if args.damping is not None:
        variants = {"damping=0": {}, f"damping={args.damping:g}": dict(damping=args.damping)}
        return compare_options(variants, "converge_damping.json")
    data = digits_data()
    problem = least_squares_problems(LS_PROBLEMS)
    results = {}
    for name in ("adamw", "quad", "skew"):
        for lr in GRIDS["digits"][name]:
            results[f"digits/ours/{name}/{lr}"] = run_digits(
                ours(name, lr), data, DIGITS_STEPS, DIGITS_EVAL
            )
        for lr in GRIDS["lsq"][name]:
            schedule = optax.cosine_decay_schedule(lr, LS_STEPS)
            results[f"lsq/ours/{name}/{lr}"] = run_least_squares_problems(
                ours(name, schedule), problem, LS_STEPS, LS_EVAL
            )
        print("done", name, file=sys.stderr, flush=True)
    if Path(args.reference_python).exists():
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "data.npz", **data)
            np.savez(Path(tmp) / "problem.npz", **problem)
            script = REFERENCE_SCRIPT.format(
                here=str(HERE),
                data=str(Path(tmp) / "data.npz"),
                problem=str(Path(tmp) / "problem.npz"),
                grids=GRIDS,
                ds=DIGITS_STEPS,
                de=DIGITS_EVAL,
                ls=LS_STEPS,
                le=LS_EVAL,
            )
            proc = subprocess.run(
                [args.reference_python, "-c", script], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            for key, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                problem_name, name, lr = key.split("/")
                results[f"{problem_name}/eformer/{name}/{lr}"] = r
    best = summarise(results)

    print("digits MLP, best learning rate per optimizer:\n")
    print("| optimizer | lr | steps to train loss 0.01 | final train loss | test acc | ms/step |")
    print("|---|---|---|---|---|---|")
    for k, b in best.items():
        if k.startswith("digits/"):
            _, impl, name = k.split("/")
            hit = steps_to(b["curve"], DIGITS_EVAL, TARGET_LOSS)
            hit = hit if hit is not None else f">{DIGITS_STEPS}"
            print(
                f"| {impl} {name} | {b['lr']:g} | {hit} "
                f"| {b['final_loss']:.4f} | {100 * b['test_accuracy']:.2f}% "
                f"| {1e3 * b['seconds_per_step']:.2f} |"
            )
    print("\nleast squares, condition number 1e4, best learning rate per optimizer:\n")
    print(
        f"geometric mean over {LS_PROBLEMS} random instances; the last columns are the final"
        " loss over the reference's, as geometric mean and per-instance range\n"
    )
    print(
        "| optimizer | lr | loss at step 200 | final loss (step 1000) | per instance "
        "| vs reference | per instance vs reference | ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
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
            print(
                f"| {impl} {name} | {b['lr']:g} | {b['curve'][200 // LS_EVAL]:.3e} "
                f"| {b['final_loss']:.3e} | {per.min():.2e}-{per.max():.2e} | {vs} "
                f"| {vs_range} | {1e3 * b['seconds_per_step']:.2f} |"
            )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "converge.json").write_text(json.dumps(best, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, problem_name, every, title in (
            (axes[0], "digits", DIGITS_EVAL, "digits MLP: full training loss"),
            (axes[1], "lsq", LS_EVAL, "least squares (cond 1e4)"),
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
        fig.savefig(HERE / "results" / "converge.png", dpi=110)
    except ImportError:
        pass
    return best


if __name__ == "__main__":
    main()
