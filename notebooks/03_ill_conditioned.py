# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # An ill-conditioned least-squares problem
#
# `loss(W) = 1/2 ||A W B - C||^2` with `W` of shape `32 x 24`. Its Hessian is
# `(B B^T) (x) (A^T A)`: exactly Kronecker-structured, with condition number
# `cond(A)^2 cond(B)^2`. With the singular values of `A` and `B` spread
# geometrically over a factor of 10 each, that is `1e4`. A Kronecker-factored
# preconditioner can learn the inverse of each factor; a diagonal one (Adam) cannot
# undo the rotations.
#
# All three whiten the gradient, so their steps have a fixed scale: each runs with
# a cosine decay of its learning rate to zero over the run, and gets a small grid
# of peak learning rates. The best run (lowest final loss) is drawn bold, the others
# faint. The peak learning rate is a traced argument of the jitted run (the
# optimizer is built inside it), so each optimizer compiles once for its grid.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import wkron_eqx as wk


m, n, steps = 32, 24, 600
rng = np.random.default_rng(0)


def with_spectrum(rows, cols, singular_values):
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    s = np.zeros((rows, cols))
    np.fill_diagonal(s, singular_values)
    return u @ s @ v.T


A = jnp.asarray(with_spectrum(m, m, np.geomspace(1, 0.1, m)), jnp.float32)
B = jnp.asarray(with_spectrum(n, n, np.geomspace(1, 0.1, n)), jnp.float32)
W_star = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
C = A @ W_star @ B
hessian = np.kron(np.asarray(B @ B.T, np.float64), np.asarray(A.T @ A, np.float64))
print(f"condition number of the Hessian: {np.linalg.cond(hessian):.3g}")


def loss_fn(W):
    return 0.5 * jnp.sum((A @ W @ B - C) ** 2)


# %%
optimizers = {
    "adamw": lambda lr: optax.adamw(lr, weight_decay=0.0),
    "quad": lambda lr: wk.quad(lr, weight_decay=0.0, dtype=jnp.float32),
    "skew": lambda lr: wk.skew(lr, weight_decay=0.0, dtype=jnp.float32),
}
grid = [1e-2, 3e-2, 1e-1, 3e-1, 1.0]
W0 = jnp.zeros((m, n))


def make_run(optimizer):
    @jax.jit
    def run(peak_lr):
        tx = optimizer(optax.cosine_decay_schedule(peak_lr, steps))

        def body(carry, _):
            W, state = carry
            loss, grad = jax.value_and_grad(loss_fn)(W)
            updates, state = tx.update(grad, state, W)
            return (optax.apply_updates(W, updates), state), loss

        _, losses = jax.lax.scan(body, (W0, tx.init(W0)), length=steps)
        return losses

    return run


curves = {}
for name, optimizer in optimizers.items():
    run = make_run(optimizer)
    curves[name] = {lr: np.asarray(run(jnp.float32(lr))) for lr in grid}
    best = min(grid, key=lambda lr: np.nan_to_num(curves[name][lr][-1], nan=np.inf))
    print(f"{name:>5}: best lr {best:g}, final loss {curves[name][best][-1]:.3e}")

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
best_final = {}
for color, (name, by_lr) in zip(["C2", "C1", "C0"], curves.items()):
    finals = {lr: np.nan_to_num(c[-1], nan=np.inf) for lr, c in by_lr.items()}
    best = min(finals, key=finals.get)
    best_final[name] = finals[best]
    for lr, c in by_lr.items():
        if lr != best:
            ax.plot(c, color=color, alpha=0.2, lw=0.8)
    ax.plot(by_lr[best], color=color, lw=2, label=f"{name} (lr={best:g})")
title = "0.5 ||A W B - C||^2, Hessian condition number 1e4"
ax.set(yscale="log", xlabel="step", ylabel="loss", title=title)
ax.legend()
fig.tight_layout()

# %%
# checks (tests/test_notebooks.py runs this notebook): both Kronecker methods beat
# the diagonal one by orders of magnitude on this problem
assert best_final["quad"] < 1e-2 * best_final["adamw"]
assert best_final["skew"] < 1e-2 * best_final["adamw"]
