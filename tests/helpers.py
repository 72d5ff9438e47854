"""Helpers shared by the test modules (no test module imports another)."""

import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def buffer_owners(tree) -> dict[int, list[str]]:
    """Each device buffer of `tree`'s arrays (by address, per addressable shard) and the
    key paths of the leaves that hold it. Zero-size arrays own no memory and are left out."""
    owners: dict[int, list[str]] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(x, jax.Array) or x.size == 0:
            continue
        for shard in x.addressable_shards:
            owners.setdefault(shard.data.unsafe_buffer_pointer(), []).append(
                jax.tree_util.keystr(path)
            )
    return owners


def assert_no_shared_buffers(tree) -> None:
    """No two leaves of `tree` share a device buffer (what buffer donation requires)."""
    shared = [names for names in buffer_owners(tree).values() if len(names) > 1]
    assert not shared, f"leaves sharing one buffer: {shared}"


def assert_trees_equal(a, b) -> None:
    """Same structure, and every leaf equal in value (NaN equals NaN, -0 equals 0)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, rtol: float, atol: float = 0.0) -> None:
    """Same structure, and every leaf equal to the tolerances."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def bits(x) -> tuple:
    """A leaf's dtype, shape and raw bytes: equal exactly when two leaves are bit-equal."""
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def assert_bit_identical(a, b) -> None:
    """Same tree structure (static fields included), and every leaf bit for bit (NaN
    payloads and the sign of zero too)."""
    leaves_a, treedef_a = jax.tree.flatten(a)
    leaves_b, treedef_b = jax.tree.flatten(b)
    assert treedef_a == treedef_b
    assert len(leaves_a) == len(leaves_b)
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        assert bits(x) == bits(y), f"leaf {i} differs"


def normal_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, jax.Array]:
    """A dict of float32 standard-normal arrays of `shapes`, drawn in the dict's order from
    `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def run_steps(tx, params, grads: Iterable, *, state=None) -> tuple[list, list]:
    """Run `jax.jit(tx.update)` once per gradient tree of `grads`, from `state` (from
    `tx.init(params)` when `None`), passing `params` to every step.

    Re-jitting the same `tx.update` reuses its compile, so a cached `tx` compiles once
    across calls.

    **Returns:**

    `(updates, states)`: the updates of every step and the state after every step.
    """
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update)
    updates, states = [], []
    for g in grads:
        u, state = update(g, state, params)
        updates.append(u)
        states.append(state)
    return updates, states


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened, in float64: 1 when both are zero, 0
    when only one is."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return float(not np.any(a) and not np.any(b))
    return float(a @ b / norms)


_COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|collective-permute"
    r"|reduce-scatter)(?:-start)?\("
)


def collectives(text: str) -> dict[str, list[int]]:
    """Op kind -> [count, elements moved] in an optimised HLO module's text (the first
    result of each op)."""
    out: dict[str, list[int]] = {}
    for _, dims, op in _COLLECTIVE.findall(text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        count, elements = out.get(op, [0, 0])
        out[op] = [count + 1, elements + size]
    return out


def fullest_device_bytes(tree) -> int:
    """The bytes of `tree`'s arrays on the device that holds the most of them."""
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def run_example(name: str, devices: int, *args: str) -> list[str]:
    """Run `examples/<name>` with `devices` simulated CPU devices; its stdout's lines
    (asserting it succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices}"
        " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    script = pathlib.Path(__file__).parent.parent / "examples" / name
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def trimmed_spec(spec) -> tuple:
    """A `PartitionSpec`'s entries without the trailing `None`s (`P()` and `P(None,
    None)` are the same)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def subprocess_report(script: str, timeout: int = 600) -> dict:
    """Run `tests/<script>` (which sets its own device count) and return the JSON object
    on the last line of its stdout (asserting it succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    here = pathlib.Path(__file__).parent
    done = subprocess.run(
        [sys.executable, str(here / script)],
        env=env,
        cwd=here.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
