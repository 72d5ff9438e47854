"""How far two runs of the same training drift apart, and how fast a 1-ulp difference grows.

Digits MLP (64-128-128-10, float32, full batch of 1,000 training images, lr 3e-3). For each
optimizer, three comparisons of the update of the first hidden weight, step by step
(`||u_a - u_b|| / ||u_b||`):

- `scan vs loop`: the step jitted and called from Python, against the same step under
  `jax.lax.scan` (two compiled programs, which XLA may fuse and reassociate differently);
- `1 ulp`: the loop against itself with one weight moved by one ulp at the start;
- `rerun`: the loop run twice (the same program): must be exactly 0.

The growth rate is the geometric mean of the per-step factor by which the 1-ulp
difference grows while it is between 1e-6 and 1e-2 (before it saturates).

    python -m benchmarks drift [--steps 60]

`--quick`: 10 steps, adamw and quad only.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import wkron_eqx as wk

from ._converge_core import mlp_init, xent
from ._harness import write_results


DESCRIPTION = "how far a scan and a loop of the same step drift apart; how fast 1 ulp grows"


def _data():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x[:1000] / 16.0, jnp.float32), jnp.asarray(y[:1000])


def _step(tx, x, y):
    def step(params, state):
        grads = jax.grad(xent)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates["w0"]

    return step


def _loop(tx, params, steps, x, y):
    step = jax.jit(_step(tx, x, y))
    state, out = tx.init(params), []
    for _ in range(steps):
        params, state, u = step(params, state)
        out.append(np.asarray(u))
    return np.stack(out)


def _scan(tx, params, steps, x, y):
    step = _step(tx, x, y)

    @jax.jit
    def run(params):
        def body(carry, _):
            params, state, u = step(*carry)
            return (params, state), u

        _, us = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return us

    return np.asarray(run(params))


def _alone(tx, params, steps, x, y, bump):
    """The optimizer without the training loop: a fixed sequence of minibatch gradients at
    the initial params, the first one's first weight moved by one ulp when `bump`."""
    idx = np.random.default_rng(0).integers(0, x.shape[0], (steps, 128))
    grads = [jax.grad(xent)(params, x[i], y[i]) for i in idx]
    if bump:
        w = grads[0]["w0"]
        at = np.unravel_index(int(jnp.argmax(jnp.abs(w))), w.shape)
        grads[0] = dict(grads[0], w0=w.at[at].set(jnp.nextafter(w[at], jnp.inf)))
    update = jax.jit(tx.update)
    state, out = tx.init(params), []
    for g in grads:
        u, state = update(g, state, params)
        out.append(np.asarray(u["w0"]))
    return np.stack(out)


def _relative(a, b):
    axes = tuple(range(1, a.ndim))
    den = np.sqrt(np.sum(b.astype(np.float64) ** 2, axis=axes))
    return np.sqrt(np.sum((a.astype(np.float64) - b) ** 2, axis=axes)) / np.maximum(den, 1e-30)


def _growth(diff):
    window = [d for d in diff if 1e-6 <= d <= 1e-2]
    idx = [i for i, d in enumerate(diff) if 1e-6 <= d <= 1e-2]
    if len(window) < 2:
        return None
    return math.exp((math.log(window[-1]) - math.log(window[0])) / (idx[-1] - idx[0]))


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=60)


def run(args):
    if args.quick:
        args.steps = 10
    x, y = _data()
    params = mlp_init([64, 128, 128, 10], 0)
    bumped = dict(params, w0=params["w0"].at[3, 5].set(jnp.nextafter(params["w0"][3, 5], 1.0)))
    kw = dict(learning_rate=3e-3, weight_decay=1e-4, dtype=jnp.float32)
    optimizers = {
        "adamw": optax.adamw(3e-3, weight_decay=1e-4),
        "quad": wk.quad(**kw),
        "skew": wk.skew(**kw),
        "quad, noise_scale=0": wk.quad(noise_scale=0.0, **kw),
        "skew, noise_scale=0": wk.skew(noise_scale=0.0, **kw),
        "quad, preconditioner_lr=0.1": wk.quad(preconditioner_lr=0.1, **kw),
        "skew, preconditioner_lr=0.1": wk.skew(preconditioner_lr=0.1, **kw),
    }
    if args.quick:
        optimizers = {name: optimizers[name] for name in ("adamw", "quad")}
    rows, lines = {}, []
    for name, tx in optimizers.items():
        loop = _loop(tx, params, args.steps, x, y)
        rerun = _relative(_loop(tx, params, args.steps, x, y), loop)
        scan = _relative(_scan(tx, params, args.steps, x, y), loop)
        ulp = _relative(_loop(tx, bumped, args.steps, x, y), loop)
        alone = _relative(
            _alone(tx, params, args.steps, x, y, True), _alone(tx, params, args.steps, x, y, False)
        )
        rows[name] = {
            "alone_ulp": [float(d) for d in alone],
            "alone_growth_per_step": _growth(list(alone)),
            "rerun_max": float(rerun.max()),
            "scan": [float(d) for d in scan],
            "ulp": [float(d) for d in ulp],
            "ulp_growth_per_step": _growth(list(ulp)),
        }
        at = [s for s in dict.fromkeys((2, 10, 20, 40, args.steps)) if s <= args.steps]
        lines.append(
            f"{name:22s} rerun {rows[name]['rerun_max']:.1e}  scan-vs-loop "
            + " ".join(f"s{s}={scan[s - 1]:.1e}" for s in at)
            + "  1ulp "
            + " ".join(f"s{s}={ulp[s - 1]:.1e}" for s in at)
            + f"  growth/step {rows[name]['ulp_growth_per_step']}"
            + "  optimizer alone 1ulp "
            + " ".join(f"s{s}={alone[s - 1]:.1e}" for s in at)
            + f"  growth/step {rows[name]['alone_growth_per_step']}"
        )
        print(lines[-1], flush=True)
    notes = (
        f"Digits MLP 64-128-128-10, float32, full batch of 1,000 images, lr 3e-3, weight "
        f"decay 1e-4, {args.steps} steps. Relative difference of the first hidden weight's "
        "update, `||u_a - u_b|| / ||u_b||`."
    )
    text = "```\n" + "\n".join(lines) + "\n```"
    write_results(args, rows, text, title="Drift between runs", notes=notes)
