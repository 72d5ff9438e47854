"""Train a small MLP on scikit-learn's bundled digits with `wk.skew`, `wk.quad` and
`optax.adamw`, each inside an `eqx.filter_jit` training step, and print the progress.

Every learning rate decays along a cosine. The Kronecker optimizers start from their
first gradients (`preconditioner_init_scale=None`, the configuration recommended for
switching from AdamW), and each optimizer gets the peak learning rate that did best on
this problem in `benchmarks/curves.py`'s grid (`benchmarks/results/curves.md`).

Run: `python examples/demo.py` (under a minute on 2 CPU cores, a third of it compiling;
no download).
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import wkron_eqx as wk


STEPS = 600
BATCH = 128
PEAK_LEARNING_RATES = {"skew": 1e-2, "quad": 1e-2, "adamw": 3e-2}


def load_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return jnp.asarray(x_train), jnp.asarray(y_train), jnp.asarray(x_test), jnp.asarray(y_test)


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


def train(name, optimizer, data, seed=0):
    x_train, y_train, x_test, y_test = data
    model = eqx.nn.MLP(64, 10, width_size=128, depth=2, key=jax.random.key(seed))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    batches = (rng.choice(x_train.shape[0], BATCH, replace=False) for _ in range(STEPS))
    # The first call traces and compiles the step; time it apart from the training.
    print(f"  [{name:>5}] compiling the training step (up to ~10 s on 2 CPU cores)...")
    start = time.perf_counter()
    idx = next(batches)
    model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx])
    loss.block_until_ready()
    compile_secs = time.perf_counter() - start
    print(f"  [{name:>5}] compiled in {compile_secs:.1f}s; step    1  batch loss {float(loss):.3g}")
    start = time.perf_counter()
    for i, idx in enumerate(batches, start=2):
        model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx])
        if i % 100 == 0:
            print(f"  [{name:>5}] step {i:4d}  batch loss {float(loss):.3g}")
    loss.block_until_ready()
    elapsed = time.perf_counter() - start
    train_loss = float(loss_fn(model, x_train, y_train))
    test_acc = float(accuracy(model, x_test, y_test))
    print(
        f"  [{name:>5}] {STEPS - 1} more steps in {elapsed:.1f}s: train loss {train_loss:.3g}, "
        f"test accuracy {100 * test_acc:.2f}%"
    )
    return train_loss, test_acc, compile_secs, elapsed


def main():
    data = load_data()
    print(f"digits: {data[0].shape[0]} train / {data[2].shape[0]} test images, 8x8 pixels")
    # float32 factors and a small weight decay suit a small model on a CPU (the defaults,
    # bfloat16 and 0.1, are the reference's, chosen for large models).
    lr = {k: optax.cosine_decay_schedule(v, STEPS) for k, v in PEAK_LEARNING_RATES.items()}
    # (`preconditioner_init_scale=None`: the factors start from the first gradient.)
    kron = dict(weight_decay=1e-4, dtype=jnp.float32, preconditioner_init_scale=None)
    optimizers = {
        "skew": wk.skew(lr["skew"], **kron),
        "quad": wk.quad(lr["quad"], **kron),
        "adamw": optax.adamw(lr["adamw"], weight_decay=1e-4),
    }
    results = {name: train(name, opt, data) for name, opt in optimizers.items()}
    print(f"\nresult (MLP 64-128-128-10, {STEPS} steps of batch {BATCH}):")
    print("| optimizer | peak lr | train loss | test accuracy | compile | training |")
    print("|---|---|---|---|---|---|")
    for name, (loss, acc, compile_secs, secs) in results.items():
        print(
            f"| {name} | {PEAK_LEARNING_RATES[name]:g} | {loss:.3g} | {100 * acc:.2f}% "
            f"| {compile_secs:.1f}s | {secs:.1f}s |"
        )


if __name__ == "__main__":
    main()
