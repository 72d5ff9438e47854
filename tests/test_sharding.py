"""Pipeline sharding: dummies, `get_opt_state_partition_specs`, and a 4-device mesh.

The multi-device checks need `--xla_force_host_platform_device_count=4` before jax is
imported, so they run once in a subprocess (`_sharded_run.py`, which prints its
measurements as JSON) and the tests below assert on that report. The dummy and spec
properties need no mesh and run here.
"""

import pathlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk
import wkron_eqx.testing as wkt

from .helpers import run_example, subprocess_report


_HERE = pathlib.Path(__file__).parent
_AXIS = "pp"


def _subprocess_report(script: str) -> dict:
    return subprocess_report(script, timeout=300)


@pytest.fixture(scope="module")
def sharded_report() -> dict:
    return _subprocess_report("_sharded_run.py")


@pytest.fixture(scope="module")
def eight_device_report() -> dict:
    return _subprocess_report("_sharded_axes.py")


def test_stacks_spread_over_two_mesh_axes(eight_device_report):
    """`pipeline_axis_name=("data", "fsdp")` on a `2 x 4` mesh (Explicit axes): every
    stacked array holds 1/8 of its stack on each of the 8 devices, the types say so,
    `get_opt_state_partition_specs` mirrors them, and the numbers are one device's."""
    run = eight_device_report["two_axes"]
    assert eight_device_report["devices"] == 8
    assert run["min_cosine"] > 0.9999
    assert run["stacks"]
    for stack in run["stacks"].values():
        assert stack["devices"] == 8 and stack["shard_rows"] == [stack["stack"] // 8], stack
        assert stack["spec"].startswith("P(('data', 'fsdp')"), stack
    assert run["specs_match"]


@pytest.mark.parametrize("layout, spec", [("rows", "P('fsdp', None)"), ("cols", "P(None, 'fsdp')")])
def test_fsdp_sharded_weights_in_a_jitted_equinox_step(eight_device_report, layout, spec):
    run = eight_device_report["fsdp"][layout]
    assert run["min_cosine"] > 0.9999
    assert run["weight_spec"] == run["mu_spec"] == run["update_spec"] == spec


def test_the_multi_device_example_runs():
    """`examples/multi_device.py`: an Explicit mesh, no shardings passed, the loss
    falls, the stacks are spread over both axes."""
    lines = run_example("multi_device.py", 4)
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert losses[-1] < 0.1 * losses[0]
    assert "P(('data', 'pipeline'), None, None)" in "\n".join(lines)


def test_pipeline_axes_are_checked_against_the_mesh(eight_device_report):
    errors = eight_device_report["two_axes"]["errors"]
    assert "`pipeline_axis_size=4`" in errors["size"] and "which is 8" in errors["size"]
    assert "['pp']" in errors["missing"]


def test_sharded_updates_match_single_device(sharded_report):
    cosines = sharded_report["min_cosine"]
    assert sharded_report["devices"] == 4
    assert set(cosines) == {
        "dense", "conv", "large", "huge", "bias", "scalar", "stack", "stack_large"
    }  # fmt: skip
    for name, cosine in cosines.items():
        assert cosine > 0.9999, name
    assert sharded_report["finite_updates"]


def _assert_spread_over_four_devices(placement: dict):
    # Every field of every dense bucket and of the three large leaves.
    fields: dict[str, set[str]] = {}
    for key in placement:
        owner, field = key.split(".")
        fields.setdefault(owner, set()).add(field)
    assert {"leaves['large']", "leaves['huge']", "leaves['stack_large']"} < set(fields)
    assert sum(owner.startswith("dense[") for owner in fields) >= 2
    for owner, names in fields.items():
        assert names == {"Ql", "Qr", "Ll", "Lr", "valid_rows", "valid_cols"}, owner
    for name, p in placement.items():
        stack = p["stack"]
        assert stack % 4 == 0, name
        assert p["devices"] == 4, name
        assert p["shard_rows"] == [stack // 4] * 4, name
        assert p["starts"] == [i * stack // 4 for i in range(4)], name
        assert p["spec"].startswith(f"P('{_AXIS}'"), name


def test_stacked_factors_spread_over_four_devices(sharded_report):
    _assert_spread_over_four_devices(sharded_report["placement"])


def test_dummies_stay_zero_and_finite_on_the_mesh(sharded_report):
    assert sharded_report["dummies_inert"]


def test_momentum_follows_params_partition_specs(sharded_report):
    mu = sharded_report["mu_spec"]
    assert mu.pop("dense") == f"P('{_AXIS}', None)"
    assert set(mu.values()) == {"P()"}


def test_constraints_alone_agree_with_specs(sharded_report):
    # Jitted without out_shardings, the state's own constraints place every array.
    assert sharded_report["constraint_mismatch"] == {"init": [], "update": []}


def test_constraints_alone_place_the_factors(sharded_report):
    # ... and that placement is the pipeline sharding itself (not, say, every array
    # replicated on both sides of the comparison).
    placement = sharded_report["constraint_placement"]
    assert set(placement) == {"init", "update"}
    for where in placement:
        _assert_spread_over_four_devices(placement[where])


def test_deprecated_with_mesh_context_is_detected(sharded_report):
    assert f"P('{_AXIS}',)" in sharded_report["legacy_mesh_specs"]


@pytest.mark.parametrize("mesh", ["explicit", "mixed"])
def test_explicit_mesh_axes_work_unwrapped(sharded_report, mesh):
    """`jax.make_mesh`'s default (Explicit axes) and a mixed mesh (`data` Explicit, the
    pipeline axis Auto): `init` and `update` run as they are, the stacks are split over
    the pipeline axis, and the momentum's and the updates' types are the params' own
    (`P(first axis, None)` for `dense`). Types only name Explicit axes, so on the mixed
    mesh the stacks' placement is read from their shards."""
    run = sharded_report[mesh]
    assert min(run["min_cosine"].values()) > 0.9999, run["min_cosine"]
    first, pipeline = ("pp", 4) if mesh == "explicit" else ("data", 2)
    if mesh == "explicit":
        for specs in (run["init_specs"], run["update_specs"]):
            assert specs and all(s.startswith(f"P('{_AXIS}'") for s in specs.values()), specs
    for placement in run["placement"].values():
        assert placement["devices"] == 4
        assert placement["shard_rows"] == [placement["stack"] // pipeline] * 4, placement
    replicated = lambda spec: spec.replace("None", "").strip("P(,) ") == ""
    for specs in (run["mu_specs"], run["update_out_specs"]):
        assert specs["dense"] == f"P('{first}', None)"
        assert all(replicated(s) for k, s in specs.items() if k != "dense"), specs


def test_cached_sides_are_sharded_like_the_factors(sharded_report):
    cached = sharded_report["cached"]
    assert cached["min_cosine"] > 0.9999
    assert cached["mismatch"] == []
    assert cached["placement"]  # dense buckets and large leaves store sides
    for placement in cached["placement"].values():
        assert placement["devices"] == 4
        assert placement["shard_rows"] == [placement["stack"] // 4] * 4


def test_damping_memory_is_replicated_and_the_step_matches_one_device(sharded_report):
    damped = sharded_report["damped"]
    assert damped["min_cosine"] > 0.9999
    assert damped["mismatch"] == []
    (placement,) = damped["placement"].values()
    # every device holds the whole vector, one float32 per leaf
    assert placement["devices"] == 4 and placement["shard_rows"] == [8] * 4, placement


def test_serialised_sharded_state_resumes_bit_identically(sharded_report):
    assert sharded_report["restored_shardings_equal"]
    assert sharded_report["resume_bit_identical"]


# -- dummies change nothing (no mesh needed) -------------------------------------------

_DUMMY_CONFIG = dict(dtype=jnp.float32, noise_scale=0.0, max_size_dense=24, block_size=8, b1=0.0)


@st.composite
def _trees(draw):
    """Shapes and scanned flags of a drawn params tree plus one large leaf."""
    params, scanned = draw(wkt.param_trees(block_size=8, max_leaves=3))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    shapes["large"], scanned["large"] = (draw(st.integers(25, 40)), draw(st.integers(2, 20))), False
    return shapes, scanned


def _run(shapes: dict, scanned: dict, pipeline_axis_size: int, grads: list):
    tx = wk.scale_by_quad(
        scanned_layers=scanned, pipeline_axis_size=pipeline_axis_size, **_DUMMY_CONFIG
    )
    state = tx.init({k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()})
    update = jax.jit(tx.update)
    outputs = []
    for g in grads:
        u, state = update(g, state)
        outputs.append(u)
    return outputs, state


@hypothesis.settings(max_examples=4)
@hypothesis.given(tree=_trees(), size=st.integers(2, 8))  # 1 is the baseline
def test_dummies_change_nothing(tree, size):
    shapes, scanned = tree
    rng = np.random.default_rng(0)
    grads = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        for _ in range(2)
    ]
    plain, plain_state = _run(shapes, scanned, 1, grads)
    padded, padded_state = _run(shapes, scanned, size, grads)
    for x in jax.tree.leaves((padded, padded_state)):
        assert np.all(np.isfinite(x))
    for u, v in zip(plain, padded, strict=True):
        for k in shapes:
            np.testing.assert_allclose(v[k], u[k], rtol=1e-6, atol=1e-6, err_msg=k)
    for a, b in zip(plain_state.dense, padded_state.dense, strict=True):
        assert b.Ql.shape[0] % size == 0 and b.valid_count == a.valid_count
        real = slice(None, a.valid_count)
        for x, y in [(a.Ql, b.Ql), (a.Qr, b.Qr), (a.Ll, b.Ll), (a.Lr, b.Lr)]:
            np.testing.assert_allclose(y[real], x[real], rtol=1e-6, atol=1e-6)
            assert np.all(np.asarray(y[a.valid_count :]) == 0)
    large, padded_large = plain_state.leaf_tree()["large"], padded_state.leaf_tree()["large"]
    assert padded_large.stack % size == 0
    for field in ("Ql", "Qr", "Ll", "Lr"):
        x, y = getattr(large, field), getattr(padded_large, field)
        np.testing.assert_allclose(y[: large.stack], x, rtol=1e-6, atol=1e-6)
        assert np.all(np.asarray(y[large.stack :]) == 0)


# -- get_opt_state_partition_specs mirrors the state -----------------------------------

_SPEC_PARAMS = {
    "dense": jax.ShapeDtypeStruct((40, 24), jnp.float32),
    "large": jax.ShapeDtypeStruct((100, 20), jnp.float32),
    "bias": jax.ShapeDtypeStruct((24,), jnp.float32),
    "scalar": jax.ShapeDtypeStruct((), jnp.float32),
    "stack": [jax.ShapeDtypeStruct((3, 16, 8), jnp.float32)],
}


def _mirror(specs, state, axis_name: str | None) -> int:
    """Assert `specs` has the structure of `state` with PartitionSpec/None leaves;
    return the number of arrays put on `axis_name`."""
    sharded = []

    def check(spec, x):
        if spec is None:
            assert jax.tree.leaves(x) == []
            return
        assert isinstance(x, jax.ShapeDtypeStruct)
        assert len(spec) <= x.ndim
        if axis_name is not None and len(spec) and spec[0] == axis_name:
            sharded.append(x)

    # `specs` must be a prefix of `state` whose every PartitionSpec meets one array and
    # every None a leafless subtree (optax's EmptyState): the same structure.
    jax.tree.map(check, specs, state, is_leaf=lambda x: isinstance(x, P) or x is None)
    return len(sharded)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("scanned", [None, {"stack": True}])
@pytest.mark.parametrize("pipeline", [None, _AXIS])
@pytest.mark.parametrize("cache", [False, True])
def test_specs_mirror_state(weight_decay, scanned, pipeline, cache):
    kwargs = dict(weight_decay=weight_decay, max_size_dense=64, block_size=16)
    if cache:
        kwargs |= dict(cache_preconditioner=True, preconditioner_update_probability=0.5)
    if scanned is not None:
        kwargs["scanned_layers"] = {k: k in scanned for k in _SPEC_PARAMS}
    if pipeline is not None:
        kwargs |= dict(pipeline_axis_name=pipeline, pipeline_axis_size=4)
    specs = wk.get_opt_state_partition_specs(_SPEC_PARAMS, **kwargs)
    state = jax.eval_shape(wk.quad(**kwargs).init, _SPEC_PARAMS)
    assert len(specs) == len(state) == 3  # a decay of 0 keeps its place in the chain
    assert specs[1:] == state[1:] == (optax.EmptyState(), optax.EmptyState())
    sharded = _mirror(specs, state, pipeline)
    inner = state[0]
    stacked = sum(len(jax.tree.leaves(d)) for d in inner.dense)
    stacked += len(jax.tree.leaves(inner.leaf_tree()["large"]))
    # with the cache, a side per factor of every dense bucket and large leaf
    sides = 0 if inner.cache is None else len(jax.tree.leaves(inner.cache))
    assert sides == (2 * len(inner.dense) + 2 if cache else 0)  # one large leaf
    assert sharded == (0 if pipeline is None else stacked + sides)


_is_spec = lambda x: isinstance(x, P)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight_decay=0.0),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, weight_decay_mask={k: k != "bias" for k in _SPEC_PARAMS}),
        dict(learning_rate=optax.cosine_decay_schedule(1e-2, 100)),
    ],
    ids=["no-decay", "decay", "masked-decay", "schedule"],
)
def test_specs_have_the_structure_of_the_state(kwargs):
    """The whole chain, with a `PartitionSpec` for every array: `optax.EmptyState()`
    where the state has one, a replicated spec for a schedule's count."""
    specs = wk.get_opt_state_partition_specs(_SPEC_PARAMS, **kwargs)
    state = jax.eval_shape(wk.quad(**kwargs).init, _SPEC_PARAMS)
    assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(state)
    rest = jax.tree.leaves(specs[1:], is_leaf=_is_spec)
    assert rest == ([P()] if "learning_rate" in kwargs else [])


def test_specs_place_a_state():
    """Through `NamedSharding`, the specs are the `out_shardings` of `init` and `update`
    and the target of `jax.device_put`: every array lands with its spec."""
    mesh = jax.make_mesh((1,), (_AXIS,))
    kwargs = dict(
        learning_rate=optax.constant_schedule(1e-2),  # (optax's cosine is not strict-dtype)
        pipeline_axis_name=_AXIS,
        max_size_dense=64,
        block_size=16,
    )
    tx = wk.quad(**kwargs)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _SPEC_PARAMS)
    specs = wk.get_opt_state_partition_specs(params, **kwargs)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        _, state = jax.jit(tx.update, out_shardings=(None, shardings))(params, state, params)
        placed = jax.device_put(tx.init(params), shardings)
    for tree in (state, placed):
        got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, tree))
        assert got == jax.tree.leaves(specs, is_leaf=_is_spec)
    assert int(state[-1].count) == 1


def test_unknown_keyword_arguments_are_refused():
    for build in (wk.get_opt_state_partition_specs, wk.tree_plan):
        with pytest.raises(TypeError, match="block_sizes"):
            build(_SPEC_PARAMS, block_sizes=8)
    # quad's own arguments are accepted, and change no layout
    assert wk.tree_plan(_SPEC_PARAMS, learning_rate=0.1, weight_decay=0.0) == wk.tree_plan(
        _SPEC_PARAMS
    )


def test_specs_default_arguments():
    specs = wk.get_opt_state_partition_specs(_SPEC_PARAMS)
    state = jax.eval_shape(wk.quad().init, _SPEC_PARAMS)
    assert len(specs) == len(state) == 3
    assert _mirror(specs, state, None) == 0
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_specs_follow_an_array_weight_decay():
    # quad/skew always chain the decay for an array weight_decay (it may be injected)
    params = {"w": jnp.ones((6, 5))}
    for wd in (jnp.array(0.0), jnp.array(0.1), 0.0, 0.1):
        specs = wk.get_opt_state_partition_specs(params, weight_decay=wd)
        assert len(specs) == len(wk.quad(weight_decay=wd).init(params))
