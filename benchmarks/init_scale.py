"""Factors from the first gradient (`preconditioner_init_scale=None`) against the identity
start, on the digits MLP (64-128-128-10, float32, minibatches of 128, weight decay 1e-4).

For each optimizer, learning rate and seed: the RMS of the first hidden weight's update
divided by the learning rate at steps 1, 5, 20 and 100, and the full training loss at
steps 50 and 100. The starts from the first gradient (`STARTS`, set through
`wkron_eqx._kron`'s constants): psgd_torch's ("full": `(mean G^4)^(1/4)`, with a factor
step on the first step), HeavyBall's ("half": the same, half way in log scale), the RMS
instead ("rms"), and each without the first factor step ("still"). "rms, still" is what
`preconditioner_init_scale=None` does.

    python benchmarks/init_scale.py [--seeds 3] [--steps 100]
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _converge_core import xent
from sklearn.datasets import load_digits

import wkron_eqx as wk
import wkron_eqx._kron as kron


RESULTS = Path(__file__).parent / "results"
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
AT = (1, 5, 20, 100)
# The starts from the first gradient: the moment of `G` the scale is read from (4:
# psgd_torch's, 2: the RMS), how far it goes (1: `P G` at unit RMS, 0.5: HeavyBall's
# half-way start), and whether the factors also move on that first step.
STARTS = {
    "identity": {},
    "full": dict(moment=4, power=1.0, moves=True),
    "half": dict(moment=4, power=0.5, moves=True),
    "rms": dict(moment=2, power=1.0, moves=True),
    "full, still": dict(moment=4, power=1.0, moves=False),
    "rms, still": dict(moment=2, power=1.0, moves=False),
}


def _params(key):
    sizes, params = [64, 128, 128, 10], {}
    keys = jax.random.split(key, len(sizes))
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jax.random.normal(keys[i], (a, b)) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros(b)
    return params


def _run(tx, x, y, steps, seeds):
    """Per seed, the first hidden weight's update RMS and the training loss at each step
    (one compiled program for all seeds)."""

    @jax.jit
    def run(key):
        k_init, k_batch = jax.random.split(key)
        params = _params(k_init)
        batches = jax.random.randint(k_batch, (steps, 128), 0, x.shape[0])

        def body(carry, idx):
            params, state = carry
            grads = jax.grad(xent)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            rms = jnp.sqrt(jnp.mean(jnp.square(updates["w0"])))
            return (params, state), (rms, xent(params, x, y))

        _, (rms, loss) = jax.lax.scan(body, (params, tx.init(params)), batches)
        return rms, loss

    return [[np.asarray(a) for a in run(jax.random.key(seed))] for seed in seeds]


def _optimizer(name, lr):
    kw = dict(learning_rate=lr, weight_decay=1e-4, dtype=jnp.float32)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=1e-4)
    rule, start = name.split(", ", 1)
    init = 1.0 if start == "identity" else None
    return getattr(wk, rule)(preconditioner_init_scale=init, **kw)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    digits = load_digits()
    x = jnp.asarray(digits.data[:1400] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:1400])
    names = ["adamw"] + [f"{r}, {s}" for r in ("quad", "skew") for s in STARTS]
    rows = []
    defaults = kron.INITIAL_SCALE_POWER, kron.INITIAL_SCALE_MOMENT, kron.FIRST_STEP_MOVES
    print(
        "| optimizer | lr | " + " | ".join(f"RMS/lr @{s}" for s in AT) + " | loss @50 | loss @100 |"
    )
    print("|---" * (4 + len(AT)) + "|")
    for name in names:
        start = STARTS.get(name.split(", ", 1)[-1], {})
        kron.INITIAL_SCALE_POWER = start.get("power", 1.0)
        kron.INITIAL_SCALE_MOMENT = start.get("moment", 4)
        kron.FIRST_STEP_MOVES = start.get("moves", True)
        for lr in LEARNING_RATES:
            tx = _optimizer(name, lr)
            runs = _run(tx, x, y, args.steps, range(args.seeds))
            rms = np.mean([r[0] for r in runs], axis=0) / lr
            loss = np.array([r[1] for r in runs])
            row = {
                "optimizer": name,
                "lr": lr,
                "rms_over_lr": {s: float(rms[s - 1]) for s in AT if s <= args.steps},
                "loss_50": [float(v) for v in loss[:, min(50, args.steps) - 1]],
                "loss_100": [float(v) for v in loss[:, -1]],
            }
            rows.append(row)
            mean = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"
            print(
                f"| {name} | {lr:g} | "
                + " | ".join(f"{v:.3f}" for v in row["rms_over_lr"].values())
                + f" | {mean(row['loss_50'])} | {mean(row['loss_100'])} |",
                flush=True,
            )
    kron.INITIAL_SCALE_POWER, kron.INITIAL_SCALE_MOMENT, kron.FIRST_STEP_MOVES = defaults
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "init_scale.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
