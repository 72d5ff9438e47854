"""Timing helpers shared by our process and the reference's (run in its own venv).

Only jax, optax and numpy are used here, so the same file serves both interpreters.
"""

import statistics
import time

import jax
import numpy as np


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def measure(tx, params, grads, repeats: int = 20, warmup: int = 3, compiles: int = 2) -> dict:
    """Compile time, warm step time and state bytes of `tx.update`.

    The update is jitted as `jax.jit(tx.update)`; the state passed in is never reused
    after a call (the reference mutates its input state outside `jit`). On a shared
    machine other load only ever adds time, so the reported step time is the fastest of
    `repeats` warm steps (`step_ms`; the median is kept as `median_ms`) and the compile
    time the fastest of `compiles` cold compiles (caches cleared in between).
    """
    state = tx.init(params)
    compile_times = []
    for _ in range(compiles):
        jax.clear_caches()
        update = jax.jit(tx.update)
        start = time.perf_counter()
        compiled = update.lower(grads, state, params).compile()
        compile_times.append(time.perf_counter() - start)
    compile_s = min(compile_times)
    temp_bytes = _temp_bytes(compiled)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    for _ in range(warmup):
        out, state = compiled(grads, state, params)
        jax.block_until_ready((out, state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, state = compiled(grads, state, params)
        jax.block_until_ready((out, state))
        times.append(time.perf_counter() - start)
    finite = bool(all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out)))
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * min(times),
        "median_ms": 1e3 * statistics.median(times),
        "state_bytes": tree_bytes(state),
        "param_bytes": tree_bytes(params),
        "flops": flops,
        "finite": finite,
        "temp_bytes": temp_bytes,
    }


def _temp_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def compile_only(tx, params, grads) -> dict:
    """Lower and compile time (seconds, cold caches) and XLA temp memory of `tx.update`;
    `params` and `grads` may be `jax.ShapeDtypeStruct`s (nothing runs)."""
    state = jax.eval_shape(tx.init, params)
    jax.clear_caches()
    update = jax.jit(tx.update)
    start = time.perf_counter()
    lowered = update.lower(grads, state, params)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "temp_bytes": _temp_bytes(compiled),
    }
