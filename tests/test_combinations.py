"""Every option that changes the step, drawn together on a tree with every leaf kind
(and with the shard-local layout of sharded leaves, planned through `mesh_axis_sizes`).

Each option has tests of its own; these catch what only their combinations break (a
`cond` whose two branches differ in dtype, a state that changes type between steps).
Tracing is cheap (`jax.eval_shape`, nothing compiled), so many combinations are traced,
each for the CPU and for the GPU backend record (GPU defaults multiply in bfloat16 and
group buckets differently, and no GPU runs this suite); a few are compiled and run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

import wkron_eqx as wk
from wkron_eqx._alias import _config
from wkron_eqx._rules import Procrustes, Quad
from wkron_eqx._transform import scale_by_white_kron


# Small sizes, so that every kind appears: `max_size_dense=128` makes the 200-row side
# of "embedding" diagonal (a large leaf), `block_size=32` cuts "w" into several tiles.
_SHAPES = {
    "w": (24, 40),  # dense, several tiles
    "embedding": (200, 16),  # large: a diagonal side and strips
    "bias": (40,),  # 1-D
    "scale": (),  # a scalar (1-D)
    "empty": (0, 8),  # no elements: passed through
    "blocks": (3, 16, 16),  # scanned (or a 3-D dense leaf)
    "block_bias": (3, 16),  # scanned 1-D (or a 2-D dense leaf)
}
_SCANNED = ("blocks", "block_bias")
_LAYOUT = dict(max_size_dense=128, block_size=32)

_OPTIONS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([jnp.float32, jnp.bfloat16]),
        "preconditioner_update_probability": st.sampled_from([1.0, 0.5, "schedule"]),
        "stochastic_rounding": st.booleans(),
        "cache_preconditioner": st.booleans(),
        "memory_save_mode": st.sampled_from([None, "one_diag", "all_diag"]),
        "damping": st.sampled_from([0.0, 5e-3]),
        "preconditioner_init_scale": st.sampled_from([1.0, None]),
        "b1": st.sampled_from([0.95, 0.0]),
        "matmul_dtype": st.sampled_from([None, jnp.float32, jnp.bfloat16]),
        "normalize_grads": st.booleans(),
        "pipeline_axis_size": st.sampled_from([1, 2]),  # padding of the stacks
        "lr_style": st.sampled_from(["adam", None]),
        "shards": st.sampled_from([None, "rows", "two_axes"]),
    }
)

# The shard-local layout, planned without a mesh (`mesh_axis_sizes`): every sharded
# leaf tiled shard by shard, as on a mesh of those sizes.
_SHARDINGS = {
    "rows": (P("fsdp", None), {"fsdp": 2}),
    "two_axes": (P("fsdp", "tp"), {"fsdp": 2, "tp": 2}),
}


def _sharded(options: dict) -> dict:
    shards = options.pop("shards")
    if shards is None:
        return options
    spec, sizes = _SHARDINGS[shards]
    specs = {
        "w": spec,
        "embedding": spec,
        "bias": P("fsdp"),  # (1-D: planned whole)
        "scale": P(),
        "empty": P(),
        "blocks": P(None, *spec),
        "block_bias": P(None, "fsdp"),
    }
    return options | dict(params_partition_specs=specs, mesh_axis_sizes=sizes)


@st.composite
def _cases(draw):
    options = draw(_OPTIONS)
    if options["normalize_grads"]:
        options["damping"] = 0.0  # refused together (tested in test_damping)
    if options["preconditioner_update_probability"] == "schedule":
        # Past its flat start at once, so that steps 2 and 3 already skip updates.
        schedule = wk.precond_update_prob_schedule(min_prob=0.5, flat_start=1)
        options["preconditioner_update_probability"] = schedule
    options = _sharded(options)
    scanned = draw(st.booleans())
    options["scanned_layers"] = {k: scanned and k in _SCANNED for k in _SHAPES}
    params_dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    rule = draw(st.sampled_from(["quad", "skew"]))
    return rule, options, params_dtype


def _params(dtype):
    return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in _SHAPES.items()}


def _types(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@settings(max_examples=40)
@given(case=_cases())
def test_every_combination_traces_for_cpu_and_gpu(case):
    """The update's outputs have the params' dtypes, and the new state has exactly the
    old one's structure, shapes and dtypes (what `lax.scan`, `cond` and donation need),
    traced for both backends."""
    rule, options, params_dtype = case
    config = _config(options | _LAYOUT)
    params = _params(params_dtype)
    for platform in ("cpu", "gpu"):
        backend = wk.Backend.of(platform)
        tx = scale_by_white_kron(Quad() if rule == "quad" else Procrustes(), config, backend)
        state = jax.eval_shape(tx.init, params)
        updates, new_state = jax.eval_shape(tx.update, params, state)
        assert _types(updates) == _types(params), platform
        assert jax.tree.structure(new_state) == jax.tree.structure(state), platform
        assert _types(new_state) == _types(state), platform


def _grads(params, step):
    key = jax.random.fold_in(jax.random.key(0), step)
    keys = jax.random.split(key, len(params))
    return {
        k: jax.random.normal(subkey, p.shape, jnp.float32).astype(p.dtype)
        for subkey, (k, p) in zip(keys, params.items(), strict=True)
    }


@settings(max_examples=5)
@given(case=_cases())
def test_combinations_run_a_few_steps(case):
    """Three jitted steps of the whole optimizer (weight decay and learning rate
    included): every update finite and in its param's dtype, the factors updated on the
    steps the probability asks for, none skipped."""
    rule, options, params_dtype = case
    make = wk.quad if rule == "quad" else wk.skew
    tx = make(learning_rate=1e-2, weight_decay=1e-3, **options, **_LAYOUT)
    params = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), _params(params_dtype))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(3):
        updates, state = step(_grads(params, t), state, params)
        for k, u in updates.items():
            assert u.dtype == params[k].dtype, k
            assert np.all(np.isfinite(np.asarray(u, np.float32))), (k, t)
        params = optax.apply_updates(params, updates)
    white_kron = state[0]
    assert int(white_kron.count) == 3
    assert int(white_kron.skipped_steps) == 0
    prob = options["preconditioner_update_probability"]
    first = options["preconditioner_init_scale"] is None
    assert int(white_kron.factor_updates) == _factor_updates(prob, first, steps=3)


def _factor_updates(prob, first: bool, steps: int) -> int:
    """How many of the first `steps` steps update the factors, by the documented
    counter scheme: due when `counter + 1 >= 1 / p(t)` (always for a constant 1), and
    on step 1 when the factors start from the first input."""
    counter, updates = 0, 0
    for t in range(1, steps + 1):
        if callable(prob):
            due = np.float32(counter + 1) >= np.float32(1) / np.float32(prob(t))
        else:
            due = prob == 1.0 or np.float32(counter + 1) >= np.float32(1) / np.float32(prob)
        if due or (first and t == 1):
            counter, updates = 0, updates + 1
        else:
            counter += 1
    return updates
