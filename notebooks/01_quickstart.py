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
# # Quick start: `wk.skew` and `wk.quad` on scikit-learn digits
#
# An `eqx.nn.MLP` classifies the 8x8 digit images bundled with scikit-learn. The same
# `eqx.filter_jit` training step runs with `wk.skew`, `wk.quad` and `optax.adamw`;
# the optimizers are drop-in `optax.GradientTransformation`s.

# %%
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import wkron_eqx as wk


digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
y = digits.target.astype(np.int32)
x_train, x_test, y_train, y_test = map(
    jnp.asarray, train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
)
print(f"{x_train.shape[0]} train / {x_test.shape[0]} test images")

# %% [markdown]
# The model holds activation functions next to its arrays, so the optimizer is
# initialised on `eqx.filter(model, eqx.is_inexact_array)`. Every hidden weight is a
# dense Kronecker-factored leaf, every bias a diagonal one. The preconditioner runs
# in float32 here (`dtype=jnp.float32`; the default is bfloat16, the reference's
# choice for large models).
#
# The peak learning rates are 1e-2 for `skew`/`quad` and 3e-3 for `adamw`, each
# decayed along a cosine. At the same learning rate the first steps of `skew`/`quad`
# are much smaller than AdamW's (their update is clipped to `0.22 x lr` and their
# factors start at the identity), so at AdamW's rate they lag far behind it for the
# first hundred or so steps. Which multiple of AdamW's rate is best depends on the
# problem (`benchmarks/results/curves.md`: a third of it on this MLP with the start
# from the gradient, 3x on a character-level LM); see `docs/choosing.md`.
#
# Each step is compiled before the clock starts (one warm-up call whose result is
# thrown away), so the timings below are training time only.

# %%
STEPS, BATCH, EVAL_EVERY = 300, 128, 10


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def evaluate(model, x, y):
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def train(optimizer, seed=0):
    model = eqx.nn.MLP(64, 10, width_size=64, depth=2, key=jax.random.key(seed))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    # warm-up: compile the step and the evaluation, and discard the results
    start = time.perf_counter()
    jax.block_until_ready(step(model, opt_state, x_train[:BATCH], y_train[:BATCH]))
    jax.block_until_ready(evaluate(model, x_test, y_test))
    compile_seconds = time.perf_counter() - start

    rng = np.random.default_rng(seed)
    losses, test_losses, test_accs = [], [], []
    train_seconds = 0.0
    for i in range(1, STEPS + 1):
        idx = rng.choice(x_train.shape[0], BATCH, replace=False)
        start = time.perf_counter()
        model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx])
        losses.append(float(loss))  # waits for the step
        train_seconds += time.perf_counter() - start
        if i % EVAL_EVERY == 0:
            test_loss, test_acc = evaluate(model, x_test, y_test)
            test_losses.append(float(test_loss))
            test_accs.append(float(test_acc))
    return dict(
        losses=np.array(losses),
        test_losses=np.array(test_losses),
        test_accs=np.array(test_accs),
        compile_seconds=compile_seconds,
        train_seconds=train_seconds,
    )


kronecker_lr = optax.cosine_decay_schedule(1e-2, STEPS)
adamw_lr = optax.cosine_decay_schedule(3e-3, STEPS)
optimizers = {
    "skew": wk.skew(kronecker_lr, weight_decay=1e-4, dtype=jnp.float32),
    "quad": wk.quad(kronecker_lr, weight_decay=1e-4, dtype=jnp.float32),
    "adamw": optax.adamw(adamw_lr, weight_decay=1e-4),
}
results = {name: train(optimizer) for name, optimizer in optimizers.items()}
for name, r in results.items():
    print(
        f"{name:>5}: test accuracy {100 * r['test_accs'][-1]:.1f}%, "
        f"{1e3 * r['train_seconds'] / STEPS:.2f} ms/step "
        f"(compiled beforehand in {r['compile_seconds']:.1f} s)"
    )

# %% [markdown]
# Left: the training loss (batch loss, smoothed over 10 steps) and the test loss.
# Right: the test accuracy during training, on its full 0-100% scale.

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
smooth = np.ones(10) / 10
eval_steps = np.arange(EVAL_EVERY, STEPS + 1, EVAL_EVERY)
for name, r in results.items():
    smoothed = np.convolve(r["losses"], smooth, "valid")
    (line,) = ax_loss.plot(np.arange(10, STEPS + 1), smoothed, label=f"{name} (train)")
    color = line.get_color()
    ax_loss.plot(eval_steps, r["test_losses"], "--", color=color, label=f"{name} (test)")
    final = f"{name}: {100 * r['test_accs'][-1]:.1f}%"
    ax_acc.plot(eval_steps, 100 * r["test_accs"], color=color, label=final)
ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy", title="loss")
ax_loss.legend(ncol=2, fontsize=8)
ax_acc.set(ylim=(0, 100), xlabel="step", ylabel="%", title="test accuracy")
ax_acc.legend(fontsize=8, loc="lower right")
fig.tight_layout()

# %%
# the notebook doubles as a check (tests/test_notebooks.py runs it)
assert all(r["test_accs"][-1] > 0.9 for r in results.values())
assert all(np.isfinite(r["losses"]).all() for r in results.values())
