"""Learning-rate sweep: `wk.quad` and `wk.skew` against `optax.adamw` on two small
scikit-learn tasks, a few seeds each. Prints a Markdown table (the one in
`docs/choosing.md`).

- **digits**: the task of `examples/demo.py` (an `eqx.nn.MLP` 64-128-128-10 on the 8x8
  digit images, batches of 128, weight decay 1e-4, float32 factors).
- **breast_cancer**: the Wisconsin breast-cancer table (30 standardised features, two
  classes), an MLP 30-64-64-2, otherwise the same.

For every optimizer, learning rate and seed it records the full training-set loss after
100 steps and after the last step, and the test accuracy after the last step. The seed
draws the initial weights and the batches (the train/test split is fixed).

A second table follows the size of the first steps on digits: the RMS of the update of
the first hidden weight, over the learning rate, at a few early steps.

Run: `python examples/lr_sweep.py [--seeds 3] [--steps 600]` (about 15 minutes on 2 CPU
cores: every run compiles its own step).
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import wkron_eqx as wk


BATCH = 128
WEIGHT_DECAY = 1e-4
EARLY_STEP = 100
# (optimizer, peak learning rate, schedule): constant, or a cosine decay to 0 over the run.
GRID = (
    *(("adamw", lr, "constant") for lr in (1e-3, 3e-3, 1e-2)),
    ("adamw", 3e-3, "cosine"),
    *(("quad", lr, "constant") for lr in (1e-3, 3e-3, 1e-2, 3e-2)),
    ("quad", 1e-2, "cosine"),
    *(("skew", lr, "constant") for lr in (1e-3, 3e-3, 1e-2, 3e-2)),
    ("skew", 1e-2, "cosine"),
)


def make_optimizer(
    name: str, peak: float, schedule: str, steps: int
) -> optax.GradientTransformation:
    learning_rate = peak if schedule == "constant" else optax.cosine_decay_schedule(peak, steps)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=WEIGHT_DECAY)
    factory = {"quad": wk.quad, "skew": wk.skew}[name]
    return factory(learning_rate=learning_rate, weight_decay=WEIGHT_DECAY, dtype=jnp.float32)


def load_task(name: str):
    if name == "digits":
        data = load_digits()
        x = (data.data / 16.0).astype(np.float32)
        width = 128
    else:
        data = load_breast_cancer()
        x = data.data.astype(np.float32)
        width = 64
    y = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    if name == "breast_cancer":
        scaler = StandardScaler().fit(x_train)
        x_train = scaler.transform(x_train).astype(np.float32)
        x_test = scaler.transform(x_test).astype(np.float32)
    arrays = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    return arrays, width, int(y.max()) + 1


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


def run(task, optimizer, seed: int, steps: int) -> tuple[float, float, float]:
    (x_train, y_train, x_test, y_test), width, classes = task
    model = eqx.nn.MLP(
        x_train.shape[1], classes, width_size=width, depth=2, key=jax.random.key(seed)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    evaluate_loss = eqx.filter_jit(loss_fn)
    rng = np.random.default_rng(seed)
    early_loss = float("nan")
    for i in range(1, steps + 1):
        idx = rng.choice(x_train.shape[0], BATCH, replace=False)
        model, opt_state, _ = step(model, opt_state, x_train[idx], y_train[idx])
        if i == EARLY_STEP:
            early_loss = float(evaluate_loss(model, x_train, y_train))
    final_loss = float(evaluate_loss(model, x_train, y_train))
    return early_loss, final_loss, float(eqx.filter_jit(accuracy)(model, x_test, y_test))


def trace_first_steps(task, checkpoints=(1, 10, 25, 50, 100, 200)):
    """RMS of the first hidden weight's update over the learning rate, at `checkpoints`."""
    (x_train, y_train, _, _), width, classes = task
    f32 = dict(weight_decay=WEIGHT_DECAY, dtype=jnp.float32)
    runs = {
        "adamw 3e-3": (3e-3, optax.adamw(3e-3, weight_decay=WEIGHT_DECAY)),
        "quad 3e-3": (3e-3, wk.quad(3e-3, **f32)),
        "skew 3e-3": (3e-3, wk.skew(3e-3, **f32)),
        "skew 3e-3, preconditioner_init_scale=10": (
            3e-3,
            wk.skew(3e-3, preconditioner_init_scale=10.0, **f32),
        ),
    }
    print("\nupdate RMS of the first hidden weight / learning rate (digits, seed 0)\n")
    print(f"| optimizer | {' | '.join(f'step {c}' for c in checkpoints)} |")
    print(f"|---|{'---|' * len(checkpoints)}")
    for label, (learning_rate, optimizer) in runs.items():
        model = eqx.nn.MLP(
            x_train.shape[1], classes, width_size=width, depth=2, key=jax.random.key(0)
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(model, opt_state, x, y, optimizer=optimizer):
            grads = eqx.filter_grad(loss_fn)(model, x, y)
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            rms = jnp.sqrt(jnp.mean(updates.layers[1].weight ** 2))
            return eqx.apply_updates(model, updates), opt_state, rms

        rng = np.random.default_rng(0)
        ratios = []
        for i in range(1, max(checkpoints) + 1):
            idx = rng.choice(x_train.shape[0], BATCH, replace=False)
            model, opt_state, rms = step(model, opt_state, x_train[idx], y_train[idx])
            if i in checkpoints:
                ratios.append(float(rms) / learning_rate)
        print(f"| {label} | {' | '.join(f'{r:.2g}' for r in ratios)} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tasks", nargs="+", default=["digits", "breast_cancer"])
    parser.add_argument(
        "--trace-only", action="store_true", help="only the table of the first steps' sizes"
    )
    args = parser.parse_args()
    if args.trace_only:
        trace_first_steps(load_task("digits"))
        return

    rows = []
    for task_name in args.tasks:
        task = load_task(task_name)
        for name, peak, schedule in GRID:
            start = time.perf_counter()
            optimizer = make_optimizer(name, peak, schedule, args.steps)
            results = np.array([run(task, optimizer, s, args.steps) for s in range(args.seeds)])
            rows.append((task_name, name, peak, schedule, results))
            print(
                f"{task_name} {name} lr={peak:g} {schedule}: "
                f"loss@{EARLY_STEP} {results[:, 0].round(4).tolist()}, "
                f"loss@{args.steps} {results[:, 1].round(6).tolist()}, "
                f"test acc {results[:, 2].round(4).tolist()} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    print(
        f"\nmean over {args.seeds} seeds (min-max); training-set loss after {EARLY_STEP} "
        f"and {args.steps} steps, test accuracy after {args.steps}; cosine: decayed to 0 "
        f"over the {args.steps} steps\n"
    )
    print(
        f"| task | optimizer | lr | train loss @ {EARLY_STEP} | train loss @ {args.steps} "
        f"| test acc @ {args.steps} |"
    )
    print("|---|---|---|---|---|---|")
    for task_name, name, peak, schedule, results in rows:
        early, final, acc = results[:, 0], results[:, 1], 100 * results[:, 2]
        lr = f"{peak:g}" if schedule == "constant" else f"{peak:g}, cosine"
        print(
            f"| {task_name} | {name} | {lr} "
            f"| {early.mean():.3g} ({early.min():.3g}-{early.max():.3g}) "
            f"| {final.mean():.2g} ({final.min():.2g}-{final.max():.2g}) "
            f"| {acc.mean():.1f}% ({acc.min():.1f}-{acc.max():.1f}) |"
        )
    trace_first_steps(load_task("digits"))


if __name__ == "__main__":
    main()
