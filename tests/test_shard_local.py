"""The shard-local layout without a mesh: planning a sharded leaf shard by shard, its
view, the one-device run of the shard-aligned layout (`mesh_axis_sizes`), and the
refusals. (On a mesh: `test_shard_local_mesh.py`.)"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import wkron_eqx as wk
from wkron_eqx._blocking import leaf_unview, leaf_view
from wkron_eqx._layout import ShardGrid, plan_tree

from .helpers import cosine, normal_tree, run_steps


F32 = jnp.float32
EXACT = dict(dtype=F32, noise_scale=0.0, weight_decay=0.0)


def _shard(x: np.ndarray, counts: tuple[int, ...], index: tuple[int, ...]) -> np.ndarray:
    """The block of `x` shard `index` of a grid of `counts` holds (NumPy slicing)."""
    return x[
        tuple(
            slice(i * (d // c), (i + 1) * (d // c))
            for d, c, i in zip(x.shape, counts, index, strict=True)
        )
    ]


@st.composite
def _sharded_leaves(draw):
    scanned = draw(st.booleans())
    rank = draw(st.integers(2, 3))
    counts = tuple(draw(st.sampled_from([1, 2, 4])) for _ in range(rank + scanned))
    shape = tuple(c * draw(st.integers(1, 6)) for c in counts)
    return shape, scanned, counts


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(_sharded_leaves(), st.sampled_from([4, 8, 16]))
def test_each_shard_is_tiled_on_its_own(leaf, block_size):
    """The view of a leaf planned by shard holds shard `s`'s block in its run `s`,
    `leaf_unview` inverts it, and every tile lies inside one shard: the kind's tiles of
    one shard (a run) are cut from that shard's elements only."""
    shape, scanned, counts = leaf
    names = tuple((f"a{d}",) if c > 1 else () for d, c in enumerate(counts))
    grid = ShardGrid(counts, names)
    plan = plan_tree((shape,), (scanned,), block_size, 10_000, 1, grids=(grid,))
    (leaf_plan,) = plan.leaves
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    view = np.asarray(leaf_view(jnp.asarray(x), leaf_plan))
    np.testing.assert_array_equal(np.asarray(leaf_unview(jnp.asarray(view), leaf_plan)), x)
    if leaf_plan.grid is None:  # a 1-D merge, or one shard: planned whole
        assert grid.shards == 1 or len(leaf_plan.merged) == 1
        return
    runs = view.reshape((grid.shards, -1))
    for s, index in enumerate(np.ndindex(*counts)):
        np.testing.assert_array_equal(np.sort(runs[s]), np.sort(_shard(x, counts, index).ravel()))
    # Buckets hold one run per shard, over the leaf's axes.
    for bucket in plan.buckets:
        assert bucket.shards == grid.shards and bucket.axes == grid.axes
        assert bucket.stack == grid.shards * bucket.run


def test_a_thin_shard_gets_right_sized_tiles():
    """A (256, 512) weight in 4 row shards with `block_size=256`: each shard is 64 x 512,
    cut into two 64 x 256 tiles (not padded to 256 x 256); the kind follows the whole
    leaf (a 20000-row leaf stays large even when its shards are small)."""
    grid = ShardGrid((4, 1), (("fsdp",), ()))
    plan = plan_tree(((256, 512), (20000, 64)), (False, False), 256, 16384, 1, grids=(grid, grid))
    dense, large = plan.leaves
    assert dense.merged == (64, 512) and dense.layout.tiles == 2
    assert [(b.rows, b.cols, b.shards, b.axes, b.stack) for b in plan.buckets] == [
        (64, 256, 4, ("fsdp",), 8)
    ]
    assert large.kind == wk.LARGE_PATH and large.merged == (5000, 64)
    assert large.layout.diag_left and not large.layout.diag_right


def test_a_shard_one_element_wide_keeps_the_leafs_merge():
    """A (16, 8) weight in 8 column shards: each shard is 16 x 1, still a 2-D (dense)
    view, not a vector; a (4, 6, 8) leaf merges each shard where it merges the whole."""
    plan = plan_tree(
        ((16, 8), (4, 6, 8)),
        (False, False),
        8,
        10_000,
        1,
        grids=(ShardGrid((1, 8), ((), ("x",))), ShardGrid((1, 1, 4), ((), (), ("x",)))),
    )
    thin, deep = plan.leaves
    assert thin.kind == wk.DENSE_PATH and thin.merged == (16, 1) and thin.shards == 8
    assert deep.merged == (24, 2)  # the whole merges to (24, 8)
    x = jnp.arange(16 * 8.0).reshape(16, 8)
    view = leaf_view(x, thin)
    assert view.shape == (8, 16, 1)
    np.testing.assert_array_equal(np.asarray(leaf_unview(view, thin)), np.asarray(x))


def _split_rows_tree(params):
    half = params["w"].shape[0] // 2
    return {"w0": params["w"][:half], "w1": params["w"][half:]}


@pytest.mark.parametrize("rule", [wk.quad, wk.skew])
def test_one_device_run_of_the_shard_aligned_layout(rule):
    """`mesh_axis_sizes` plans the shard-local layout with no mesh: a (48, 40) weight in
    2 row shards has each shard's factors evolve exactly as a tree of the two halves
    (each its own leaf) does, step after step: the factor updates never see the other
    shard. (The updates differ only by the RMS clip, which is the whole leaf's.)"""
    params = normal_tree({"w": (48, 40)}, seed=0)
    grads = [normal_tree({"w": (48, 40)}, seed=s) for s in range(1, 4)]
    kw = dict(EXACT, block_size=16, lr_style=None)
    sharded = rule(1e-2, params_partition_specs=P("fsdp", None), mesh_axis_sizes={"fsdp": 2}, **kw)
    halves = rule(1e-2, **kw)
    s1, s2 = sharded.init(params), halves.init(_split_rows_tree(params))
    for g in grads:
        _, s1 = jax.jit(sharded.update)(g, s1, params)
        _, s2 = jax.jit(halves.update)(_split_rows_tree(g), s2, _split_rows_tree(params))
    # Each sharded bucket: shard 0's tiles, then shard 1's; the halves' bucket: leaf
    # w0's tiles then w1's: the same order.
    assert len(s1[0].dense) == len(s2[0].dense) == 4
    for b1, b2 in zip(s1[0].dense, s2[0].dense, strict=True):
        assert b1.Ql.shape == b2.Ql.shape
        for a, b in zip((b1.Ql, b1.Qr, b1.Ll, b1.Lr), (b2.Ql, b2.Qr, b2.Ll, b2.Lr), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_whole_tiles_per_shard_give_the_unsharded_updates():
    """Where each shard holds whole tiles of the unsharded layout (a (64, 48) weight in
    4 row shards, block 16), the shard-local updates are the unsharded ones."""
    shapes = {"w": (64, 48), "stack": (2, 32, 64), "b": (48,)}
    specs = {"w": P("fsdp", None), "stack": P(None, None, "fsdp"), "b": P()}
    params = normal_tree(shapes, seed=0)
    kw = dict(EXACT, block_size=16, scanned_layers={"w": False, "stack": True, "b": False})
    local = wk.quad(1e-2, params_partition_specs=specs, mesh_axis_sizes={"fsdp": 4}, **kw)
    whole = wk.quad(1e-2, follow_shards=False, **kw)
    plans = local.init(params)[0].plan.tree, whole.init(params)[0].plan.tree
    assert [leaf.grid is not None for leaf in plans[0].leaves] == [False, True, True]
    assert [leaf.grid for leaf in plans[1].leaves] == [None] * 3
    grads = [normal_tree(shapes, seed=s) for s in range(1, 5)]
    (a, _), (b, _) = run_steps(local, params, grads), run_steps(whole, params, grads)
    for step_a, step_b in zip(a, b, strict=True):
        for x, y in zip(jax.tree.leaves(step_a), jax.tree.leaves(step_b), strict=True):
            assert cosine(x, y) > 0.999999


def test_uneven_shards_are_refused_at_init():
    params = {"w": jnp.zeros((30, 8))}
    tx = wk.quad(1e-2, params_partition_specs=P("fsdp", None), mesh_axis_sizes={"fsdp": 4})
    with pytest.raises(ValueError, match=r"\['w'\] has size 30 along dimension 0.*4 shards"):
        tx.init(params)


def test_unknown_mesh_axes_are_refused_at_init():
    tx = wk.quad(1e-2, params_partition_specs=P("model", None), mesh_axis_sizes={"fsdp": 4})
    with pytest.raises(ValueError, match=r"mesh axes \['model'\].*lacks"):
        tx.init({"w": jnp.zeros((8, 8))})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(follow_shards="yes"), "follow_shards"),
        (dict(mesh_axis_sizes={"fsdp": 0}), "mesh_axis_sizes"),
        (dict(mesh_axis_sizes={"fsdp": 2.0}), "mesh_axis_sizes"),
        (dict(mesh_axis_sizes=[("fsdp", 2)]), "mesh_axis_sizes"),
    ],
)
def test_bad_shard_arguments_are_refused(kwargs, match):
    # (A runtime type checker refuses them first, where one is active.)
    with pytest.raises((ValueError, TypeError), match=match):
        wk.quad(1e-2, **kwargs)


def test_follow_shards_false_keeps_the_whole_leaf_layout():
    params = {"w": jnp.zeros((64, 48))}
    kw = dict(params_partition_specs=P("fsdp", None), mesh_axis_sizes={"fsdp": 4}, block_size=16)
    on, off = wk.tree_plan(params, **kw), wk.tree_plan(params, follow_shards=False, **kw)
    assert on.leaves[0].grid is not None and off.leaves[0].grid is None
    assert off == wk.tree_plan(params, block_size=16)


def test_specs_name_the_shard_axes():
    """`get_opt_state_partition_specs` gives a sharded leaf's stacks its shards' axes
    (and the pipeline axis, for a spread over replicas, after them)."""
    params = {"w": jax.ShapeDtypeStruct((64, 48), F32), "b": jax.ShapeDtypeStruct((48,), F32)}
    kw = dict(
        params_partition_specs={"w": P("fsdp", None), "b": P()},
        mesh_axis_sizes={"fsdp": 4, "data": 2},
        block_size=16,
    )
    specs, *_ = wk.get_opt_state_partition_specs(params, **kw)
    assert {d.Ql for d in specs.dense} == {P("fsdp", None, None)}
    specs, *_ = wk.get_opt_state_partition_specs(params, pipeline_axis_name="data", **kw)
    assert {d.Ql for d in specs.dense} == {P(("fsdp", "data"), None, None)}
    state = wk.quad(1e-2, pipeline_axis_name="data", **kw).init(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    )
    # Each shard's run padded to the spread over `data`: an even count per shard.
    assert all(d.Ql.shape[0] % 8 == 0 for d in state[0].dense)
    assert optax.tree.size(state) > 0


def test_preconditioner_stats_read_every_shards_factors():
    """`preconditioner_stats` on a state planned by shard: a (48, 40) weight in 2 row
    shards has 2 x 6 tiles of block 16 (rows 16 + 8, columns 16 + 16 + 8 per shard),
    and a large (200, 16) leaf one strip per shard; every statistic is finite."""
    params = {"w": jnp.ones((48, 40)), "e": jnp.ones((200, 16))}
    tx = wk.quad(
        1e-2,
        dtype=F32,
        block_size=16,
        max_size_dense=128,
        params_partition_specs=P("fsdp", None),
        mesh_axis_sizes={"fsdp": 2},
    )
    grads = normal_tree({"w": (48, 40), "e": (200, 16)}, seed=1)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    stats = wk.preconditioner_stats(state[0])
    assert stats["w"]["Ll"].shape == (12,) and stats["e"]["Ll"].shape == (2,)
    for leaf in stats.values():
        for key in ("Ll", "Lr", "rms_left", "rms_right"):
            assert np.all(np.isfinite(np.asarray(leaf[key]))), key
