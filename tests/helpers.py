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
