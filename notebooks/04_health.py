# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What a healthy preconditioner looks like
#
# `wk.preconditioner_stats(state)` reads, for every parameter, the statistics of its
# factors: the layout (`kind`, `tiles`, `padding_fraction`), the Lipschitz estimates
# `Ll`/`Lr` of each factor's update, and `rms_left`/`rms_right`, the root mean square
# of each factor's singular values (`1` for the identity). These are one elementwise
# pass over the factors, cheap enough to return from every jitted training step.
# `condition_numbers=True` adds `cond_left`/`cond_right`, which take an SVD of every
# dense factor: on a 2-core CPU that multiplies the step time of an MLP 784-512-512-10
# by several times (`benchmarks/results/stats_cost.md`), so this notebook reads them
# from the state at a few checkpoints only.
#
# The run: an `eqx.nn.MLP` (64-64-64-10) on scikit-learn's digits, `wk.quad` with a
# float32 state and factors started from the first gradient
# (`preconditioner_init_scale=None`), 400 steps of 128 images. Then the same model at
# a learning rate 100x too large, to see what a failing run shows.

# %%
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import wkron_eqx as wk


digits = load_digits()
x = jnp.asarray(digits.data / 16.0, jnp.float32)
y = jnp.asarray(digits.target, jnp.int32)
STEPS, BATCH = 400, 128
CHECKPOINTS = (0, 1, 10, 50, 100, 200, 400)  # where the condition numbers are read


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def by_leaf(stats):
    """The stats tree (the model's structure) as `{"layers[0].weight": {...}, ...}`."""
    is_stats = lambda s: isinstance(s, dict) and "kind" in s
    flat = jax.tree_util.tree_flatten_with_path(stats, is_leaf=is_stats)[0]
    return {jax.tree_util.keystr(path)[1:]: s for path, s in flat}


def train(learning_rate):
    """400 steps; the cheap stats of every step (returned by the jitted step itself), the
    condition numbers at `CHECKPOINTS`, and the batch losses."""
    optimizer = wk.quad(
        learning_rate, weight_decay=1e-4, dtype=jnp.float32, preconditioner_init_scale=None
    )
    model = eqx.nn.MLP(64, 10, width_size=64, depth=2, key=jax.random.key(0))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        stats = wk.preconditioner_stats(opt_state)  # cheap: no decomposition
        return eqx.apply_updates(model, updates), opt_state, loss, stats

    condition = eqx.filter_jit(lambda s: wk.preconditioner_stats(s, condition_numbers=True))
    rng = np.random.default_rng(0)
    losses, history = [], [by_leaf(wk.preconditioner_stats(opt_state))]
    conds = {0: by_leaf(condition(opt_state))}
    for i in range(1, STEPS + 1):
        idx = rng.choice(x.shape[0], BATCH, replace=False)
        model, opt_state, loss, stats = step(model, opt_state, x[idx], y[idx])
        losses.append(float(loss))
        history.append(by_leaf(stats))
        if i in CHECKPOINTS:
            conds[i] = by_leaf(condition(opt_state))
    # one array per leaf and statistic: [step, tiles] (step 0 is the initial state)
    history = jax.tree.map(lambda *xs: np.stack(xs), *history)
    return dict(
        losses=np.array(losses),
        history=history,
        conds=conds,
        final_loss=float(loss_fn(model, x, y)),
        opt_state=opt_state,
    )


healthy = train(optax.cosine_decay_schedule(1e-2, STEPS))
print(f"full-data loss after {STEPS} steps: {healthy['final_loss']:.4f}")

# %% [markdown]
# The layout does not change during training; the padding is that of the last
# weight, `10 x 64`, whose 10 rows are stored as 16 (rounded up to a multiple of 8).

# %%
history = healthy["history"]
print(f"{'leaf':>16} {'kind':>6} {'tiles':>5} {'padding':>8}")
for name, s in history.items():
    kind = wk.LeafKind(int(s["kind"][0])).name
    print(f"{name:>16} {kind:>6} {int(s['tiles'][0]):>5} {float(s['padding_fraction'][0]):>8.1%}")

# %% [markdown]
# Every statistic over training (the largest over a leaf's tiles; each leaf here is one
# tile). Weights in colour with the left factor solid and the right one dashed, biases
# dotted. A factor's Lipschitz estimate follows `l = ||A||_2 + c`, where
# `A = Pg Pg^T` (`Pg^T Pg` for the right side) is the statistic the factor is fitted to
# and `c` its target: it jumps up to `l` at once and decays toward it by 5% a step,
# hence the saw teeth. It is 0 until the factors' first update (the first step), so the
# log scale starts at step 1.

# %%
steps = np.arange(STEPS + 1)
weights = [n for n in history if n.endswith("weight")]
biases = [n for n in history if n.endswith("bias")]
colors = {n: f"C{i}" for i, n in enumerate(weights)} | {b: f"C{i}" for i, b in enumerate(biases)}
fig, axes = plt.subplots(2, 2, figsize=(11, 7))
ax_loss, ax_L, ax_rms, ax_cond = axes.ravel()
smoothed = np.convolve(healthy["losses"], np.ones(10) / 10, "valid")
ax_loss.plot(np.arange(10, STEPS + 1), smoothed)
ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy", title="batch loss (10-step mean)")
for name, s in history.items():
    style = ":" if name in biases else "-"
    ax_L.plot(steps[1:], s["Ll"].max(1)[1:], style, color=colors[name], label=name)
    ax_rms.plot(steps, s["rms_left"].max(1), style, color=colors[name], label=name)
    if name in weights:
        ax_L.plot(steps[1:], s["Lr"].max(1)[1:], "--", color=colors[name])
        ax_rms.plot(steps, s["rms_right"].max(1), "--", color=colors[name])
at = np.array(CHECKPOINTS)
for name in history:
    style = ":o" if name in biases else "-o"
    cond_left = [healthy["conds"][i][name]["cond_left"].max() for i in at]
    ax_cond.plot(at, cond_left, style, color=colors[name], ms=4, label=name)
    if name in weights:
        cond_right = [healthy["conds"][i][name]["cond_right"].max() for i in at]
        ax_cond.plot(at, cond_right, "--o", color=colors[name], ms=4)
ax_L.set(yscale="log", xlabel="step", title="Lipschitz estimates Ll (solid), Lr (dashed)")
ax_rms.set(yscale="log", xlabel="step", title="RMS singular value of each factor")
ax_cond.set(yscale="log", xlabel="step", title="condition numbers (checkpoints)")
ax_L.legend(fontsize=7, ncol=2)
fig.tight_layout()


# %% [markdown]
# The ranges of this healthy run, after the first step (when the factors are set from
# the first gradient):


# %%
def value_range(stats, names, keys):
    values = np.concatenate([stats[n][k].ravel() for n in names for k in keys if k in stats[n]])
    return float(values.min()), float(values.max())


after_first = jax.tree.map(lambda a: a[1:], history)
late_conds = {  # checkpoints from step 10 on, stacked like the history
    n: {k: np.stack([healthy["conds"][i][n][k] for i in CHECKPOINTS[2:]]) for k in s}
    for n, s in healthy["conds"][0].items()
}
ranges = {
    "weights: Ll, Lr": value_range(after_first, weights, ("Ll", "Lr")),
    "weights: rms_left, rms_right": value_range(after_first, weights, ("rms_left", "rms_right")),
    "weights: cond (steps 10-400)": value_range(late_conds, weights, ("cond_left", "cond_right")),
    "biases: Ll": value_range(after_first, biases, ("Ll",)),
    "biases: rms_left": value_range(after_first, biases, ("rms_left",)),
    "biases: cond (steps 10-400)": value_range(late_conds, biases, ("cond_left",)),
}
for label, (low, high) in ranges.items():
    print(f"{label:>30}: {low:9.3g} .. {high:9.3g}")

# %% [markdown]
# ## A failing run
#
# The same model at a constant learning rate of 1.0 (100x the healthy peak). The step
# stays finite (its RMS is clipped), so no step is skipped and every statistic stays
# finite; but the batch loss jumps to 10-100 and the run ends near chance
# (`ln 10 = 2.3`). The weights' Lipschitz estimates show it from the first steps: they
# jump orders of magnitude above anything the healthy run reached.

# %%
failing = train(1.0)
print(f"full-data loss after {STEPS} steps: {failing['final_loss']:.4f}")
fig, (ax_loss, ax_L) = plt.subplots(1, 2, figsize=(11, 3.5))
for label, run, style in [("healthy", healthy, "-"), ("lr 1.0", failing, "--")]:
    smoothed = np.convolve(run["losses"], np.ones(10) / 10, "valid")
    ax_loss.plot(np.arange(10, STEPS + 1), smoothed, style, color="k", label=label)
    for name in weights:
        Ll = run["history"][name]["Ll"].max(1)[1:]
        ax_L.plot(steps[1:], Ll, style, color=colors[name], label=f"{name} ({label})")
ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy", title="batch loss (10-step mean)")
ax_loss.legend()
ax_L.set(yscale="log", xlabel="step", title="Ll of each weight")
ax_L.legend(fontsize=7, ncol=2)
fig.tight_layout()
failing_after_first = jax.tree.map(lambda a: a[1:], failing["history"])
failing_L = value_range(failing_after_first, weights, ("Ll", "Lr"))
failing_rms = value_range(failing_after_first, weights, ("rms_left", "rms_right"))
print(f"weights' Ll, Lr after the first step: {failing_L[0]:.3g} .. {failing_L[1]:.3g}")
low, high = failing_rms
print(f"weights' rms_left, rms_right after the first step: {low:.3g} .. {high:.3g}")
for label, run in [("healthy", healthy), ("lr 1.0", failing)]:
    early = max(run["history"][n][k][1:11].max() for n in weights for k in ("Ll", "Lr"))
    print(f"{label:>8}: largest Ll, Lr of the weights over steps 1-10: {early:.3g}")

# %%
# checks (tests/test_notebooks.py runs this notebook)
assert healthy["final_loss"] < 0.05 and failing["final_loss"] > 1.0
state = healthy["opt_state"][0]
assert int(state.skipped_steps) == 0 and int(failing["opt_state"][0].skipped_steps) == 0
assert all(np.isfinite(a).all() for a in jax.tree.leaves((history, failing["history"])))
for name, s in history.items():
    assert (s["Ll"][0] == 0).all() and (s["Ll"][1:] > 0).all()  # 0 until the first update
    assert (s["padding_fraction"] == s["padding_fraction"][0]).all()
np.testing.assert_allclose(history["layers[2].weight"]["padding_fraction"], 1 - 10 / 16)
# the condition numbers read the factors: the two 64 x 64 weights' tiles share a
# bucket, against NumPy
[bucket] = [d for d in state.dense if d.Ql.shape == (2, 64, 64)]
numpy_cond = sorted(np.linalg.cond(np.asarray(q, np.float64)) for q in bucket.Ql)
stats_cond = sorted(float(healthy["conds"][STEPS][n]["cond_left"][0]) for n in weights[:2])
np.testing.assert_allclose(stats_cond, numpy_cond, rtol=1e-3)
assert ranges["weights: rms_left, rms_right"][0] > 1.0  # the factors grew
assert failing_L[1] > 100 * ranges["weights: Ll, Lr"][1]
assert early > 100 * ranges["weights: Ll, Lr"][1]  # the failing run's, within 10 steps
