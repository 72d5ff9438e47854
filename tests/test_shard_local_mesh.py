"""The shard-local layout on a simulated `2 x 4` mesh (`_shard_local_run.py`, in a
subprocess with 8 devices): every option set against one device with the same layout,
where the stacks live, what a training step communicates, checkpoints, Auto and mixed
meshes."""

import pathlib

import pytest

from .helpers import run_example, subprocess_report


_HERE = pathlib.Path(__file__).parent
OPTION_SETS = [
    "default",
    "bf16 + stochastic rounding + p=0.5 + cache",
    "one_diag + damping + init from the gradient",
    "skew, all_diag, b1=0",
    "ZeRO over data",
]


@pytest.fixture(scope="module")
def report() -> dict:
    return subprocess_report("_shard_local_run.py")


@pytest.mark.parametrize("name", OPTION_SETS)
def test_each_option_set_computes_the_one_device_shard_aligned_step(report, name):
    """Sharded over the mesh, the updates are a one-device run's of the same layout
    (`mesh_axis_sizes`), finite, sharded like the params; the state's shardings are
    what `get_opt_state_partition_specs` says; the factors updated on schedule."""
    run = report["options"][name]
    assert report["devices"] == 8
    assert run["min_cosine"] > 0.9999
    assert run["finite"] and run["specs_match"] and run["updates_sharded_like_params"]
    assert run["factor_updates"] == (1 if "p=0.5" in name else 3)


def test_each_stack_lives_on_its_leafs_shards(report):
    """Rows or columns over `fsdp`: the stacks over `fsdp`; a leaf on two axes, or a
    scanned stack with its layer axis over `data`, over both (major axis first); with
    the ZeRO option the `data` replicas spread each shard's entries."""
    stacks = report["options"]["default"]["stacks"]
    assert set(stacks.values()) == {
        "P('fsdp', None, None)",
        "P(('fsdp', 'data'), None, None)",
        "P(('data', 'fsdp'), None, None)",
    }
    assert stacks["['embed']"] == "P('fsdp', None, None)"
    zero = report["options"]["ZeRO over data"]["stacks"]
    assert "P(('fsdp', 'data'), None, None)" in zero.values()
    assert all("data" in spec for spec in zero.values())


def test_state_per_device_shrinks_with_the_shards(report):
    """The fullest device holds about a quarter of the state (most leaves are in 4
    shards; the vector and the scalars are replicated)."""
    run = report["options"]["default"]
    assert run["fullest_device_bytes"] < 0.3 * run["single_device_bytes"]


def test_a_training_step_moves_adamws_bytes(report):
    """The whole FSDP training step (the loss's gathers, the gradients' reductions):
    with the shard-local layout the optimizer adds only per-leaf scalars (two small
    all-reduces) to AdamW's collectives; the old layout gathers and permutes its
    stacks."""
    comm = report["collectives"]
    total = lambda name: sum(op["elements"] for op in comm[name].values())
    assert total("quad") <= 1.15 * total("adamw")
    assert comm["quad"]["all-gather"] == comm["adamw"]["all-gather"]
    assert set(comm["quad"]) <= {"all-gather", "all-reduce", "reduce-scatter"}
    assert comm["quad"].get("all-reduce", {"elements": 0})["elements"] <= 64
    assert total("quad, old layout") > 3 * total("adamw")


def test_a_checkpoint_restores_into_a_sharded_state_bit_for_bit(report):
    run = report["checkpoint_and_meshes"]
    assert run["restored_bit_identical"] and run["restored_sharding_kept"]


@pytest.mark.parametrize("mesh", ["auto", "mixed"])
def test_auto_and_mixed_meshes_plan_the_same_layout(report, mesh):
    """With Auto axes the shardings come from `params_partition_specs`: the same plan
    as the Explicit mesh's types give, the stacks spread over all 8 devices' shards."""
    run = report["checkpoint_and_meshes"][mesh]
    assert run["same_plan"] and run["finite"]
    assert run["dense_devices"] == [8]


def test_the_fsdp_example_trains_and_moves_adamws_bytes():
    """`examples/fsdp.py`: the loss falls, every dense stack lives over `fsdp`, and the
    training step communicates what AdamW's does (to 1%)."""
    lines = run_example("fsdp.py", 8, "--steps", "40")
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert losses[-1] < 0.75 * losses[0]
    buckets = [line for line in lines if "dense bucket" in line]
    assert buckets and all("P('fsdp', None, None)" in line for line in buckets)
    total = {
        line.split(":")[0].strip(): float(line.rsplit("total ", 1)[1].rstrip(")"))
        for line in lines
        if "(total" in line
    }
    assert total["quad"] <= 1.01 * total["adamw"]


def test_jit_with_the_specs_shardings_computes_the_same_step(report):
    assert report["jit_and_nnx"]["jit_out_shardings_equal_eager"]


def test_flax_nnx_partitioned_params_follow_their_shards(report):
    """`nnx.with_partitioning` kernels on an Explicit mesh: both kernels are planned by
    shard, their stacks live over `fsdp`, and `nnx.jit` training lowers the loss."""
    run = report["jit_and_nnx"]["nnx"]
    assert run["sharded_leaves"] == 2
    assert run["dense_specs"] == ["P('fsdp', None, None)"]
    assert run["losses"][-1] < run["losses"][0]
