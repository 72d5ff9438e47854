"""Helpers shared by the test modules (no test module imports another)."""

import jax
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
    """Same structure, and every leaf equal bit for bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
