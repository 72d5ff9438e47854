"""Training loops for `converge` (and `drift`), in plain JAX + optax so that the same code
runs in our environment and in the reference's (which has neither equinox nor
scikit-learn nor `wkron_eqx`)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_init(sizes, seed):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        params[f"b{i}"] = np.zeros(b, np.float32)
    return jax.tree.map(jnp.asarray, params)


def mlp_apply(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def xent(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def run_digits(tx, data, steps, eval_every):
    """Minibatch training; returns full-train-loss curve, test accuracy, seconds/step."""
    x_train, y_train, x_test, y_test, batches = (jnp.asarray(data[k]) for k in data)
    params = mlp_init([x_train.shape[1], 128, 128, 10], 0)
    state = tx.init(params)

    @jax.jit
    def chunk(params, state, idx):
        def body(carry, i):
            params, state = carry
            grads = jax.grad(xent)(params, x_train[i], y_train[i])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, state), idx)
        return params, state, xent(params, x_train, y_train)

    curve = [float(xent(params, x_train, y_train))]
    jax.block_until_ready(chunk(params, state, batches[:eval_every]))  # compile
    start = time.perf_counter()
    for k in range(0, steps, eval_every):
        params, state, loss = chunk(params, state, batches[k : k + eval_every])
        curve.append(float(loss))
    seconds = (time.perf_counter() - start) / steps
    acc = float(jnp.mean(jnp.argmax(mlp_apply(params, x_test), -1) == y_test))
    return {"curve": curve, "test_accuracy": acc, "seconds_per_step": seconds}


def least_squares_problem(n=48, condition=1e4, seed=0):
    """0.5 ||A W B - C||^2 with Hessian B B^T (x) A^T A of the given condition number."""
    rng = np.random.default_rng(seed)
    qa, _ = np.linalg.qr(rng.standard_normal((n, n)))
    qb, _ = np.linalg.qr(rng.standard_normal((n, n)))
    # each factor contributes sqrt(condition) to the Hessian's condition number
    spectrum = np.logspace(0, -0.25 * np.log10(condition), n)
    A = (qa * spectrum) @ qa.T
    B = (qb * spectrum) @ qb.T
    W_star = rng.standard_normal((n, n))
    C = A @ W_star @ B
    return {k: np.asarray(v, np.float32) for k, v in {"A": A, "B": B, "C": C}.items()}


def run_least_squares(tx, problem, steps, eval_every):
    A, B, C = (jnp.asarray(problem[k]) for k in ("A", "B", "C"))
    loss_fn = lambda p: 0.5 * jnp.sum(jnp.square(A @ p["W"] @ B - C))
    params = {"W": jnp.zeros((A.shape[1], B.shape[0]), jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def chunk(params, state):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, state), None, length=eval_every)
        return params, state, loss_fn(params)

    curve = [float(loss_fn(params))]
    jax.block_until_ready(chunk(params, state))
    start = time.perf_counter()
    for _ in range(0, steps, eval_every):
        params, state, loss = chunk(params, state)
        curve.append(float(loss))
    return {"curve": curve, "seconds_per_step": (time.perf_counter() - start) / steps}


def least_squares_problems(count, n=48, condition=1e4):
    """`count` instances (seeds 0..count-1) stacked along a leading axis."""
    problems = [least_squares_problem(n, condition, seed) for seed in range(count)]
    return {k: np.stack([p[k] for p in problems]) for k in problems[0]}


def run_least_squares_problems(tx, problems, steps, eval_every):
    """`run_least_squares` on every stacked instance; the curve is their geometric mean.

    One instance's final loss swings by about 1.3x with the problem's random rotations
    (and with the optimizer's noise draws), so a single instance cannot resolve a 10%
    difference; the geometric mean over several can.
    """
    runs = [
        run_least_squares(tx, {k: v[i] for k, v in problems.items()}, steps, eval_every)
        for i in range(len(problems["A"]))
    ]
    curves = np.array([r["curve"] for r in runs], np.float64)
    return {
        "curve": np.exp(np.log(curves).mean(0)).tolist(),
        "final_per_problem": curves[:, -1].tolist(),
        "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs])),
    }
