"""Shards thinner than `block_size`: what the two targets the shard-local layout misses
there (state per device <= 1.1x its share, compile <= 1.5x the one-device step's)
would cost if the layout were changed to meet them.

A weight sharded by rows into shards of fewer rows than `block_size` is tiled shard by
shard, so its tiles are thin (`96 x 256` for the 768-wide blocks of `fsdp_comm`'s
transformer on 8 shards): each keeps a full `256 x 256` factor for the unsharded side
(the state over its share), and the thin shards add tile shapes that a CPU compiles as
compute groups of their own (the compile time). Two measurements, each against the
default layout:

- `quality`: the two ways to shrink the state, on the char-LM's loss. "Square tiles":
  a thin shard's tiles are cut no wider than the shard is thin (a counterfactual: the
  planning rule is replaced in this process only; no option of the package gives it).
  "Half block_size": the option every user has. With every leaf planned whole for
  reference. The model is `fsdp_comm`'s transformer at a quarter of its width (d=192,
  vocab 1024, `block_size=64`, weights in 8 row shards: 24-row shards of 64-wide
  tiles, the proportions of the full model's 96 of 256), trained on one device in the
  layout of the mesh (`mesh_axis_sizes`, the same maths as on the mesh), on
  standard-library source text.
- `grouping`: merging the thin shards' tile shapes into fewer compute groups, on
  compile and step time: the accelerator's grouping (padding budget 1.0) against the
  CPU's (0.1, the default), on `fsdp_comm`'s full transformer and meshes (simulated,
  8 CPU devices).

    python -m benchmarks thin_shards [--quick] [--parts quality,grouping]

Writes `benchmarks/results/thin_shards.{json,md}`.
"""

import os


# Eight simulated CPU devices for `grouping` (read when jax starts its backend).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk
from wkron_eqx import _backend, _layout

from ._harness import write_results
from .curves import stdlib_text
from .fsdp_comm import init_params, loss, sizes, weight_specs
from .large_shards import BATCH, CONTEXT, batches, fit


DESCRIPTION = "shards thinner than block_size: state, loss, compile and step time trade-offs"
DIMS = dict(vocab=1024, d=192, layers=2, heads=3)
SHARDS, BLOCK = 8, 64
SCANNED = {"embed": False, "blocks": True, "norm": False}


# The counterfactuals, each patched into this process for the rows that use it.


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    _layout.plan_tree.cache_clear()
    try:
        yield
    finally:
        setattr(module, name, old)
        _layout.plan_tree.cache_clear()


def _square_tiles(plan_leaf):
    """`leaf_plan`, except that a dense leaf planned by shard whose shard is thinner than
    `block_size` along a sharded side is cut no wider than that along the other side."""

    def leaf_plan(shape, scanned, block_size, *args, **kwargs):
        plan = plan_leaf(shape, scanned, block_size, *args, **kwargs)
        if plan.grid is None or plan.kind != wk.DENSE_PATH:
            return plan
        body = plan.leaf_shape[1:] if scanned else plan.leaf_shape
        counts = plan.grid.counts[1:] if scanned else plan.grid.counts
        split = _layout.merge_split(body)
        rows, cols = plan.merged
        row_block = col_block = block_size
        if math.prod(counts[:split]) > 1 and rows < block_size:
            col_block = _layout.tile_side(rows, block_size)
        if math.prod(counts[split:]) > 1 and cols < block_size:
            row_block = _layout.tile_side(cols, block_size)
        row_parts = _layout.split_axis(rows, row_block)
        col_parts = _layout.split_axis(cols, col_block)
        stored = lambda rp, cp: (
            _layout.tile_side(rp.size, row_block),
            _layout.tile_side(cp.size, col_block),
        )
        groups = tuple(
            _layout.TileGroup(rp, cp, stored(rp, cp)) for rp in row_parts for cp in col_parts
        )
        tiles = plan.batch * sum(g.tiles for g in groups)
        layout = _layout.DenseLayout(row_parts, col_parts, groups, tiles)
        return dataclasses.replace(plan, layout=layout)

    return leaf_plan


# `quality`


def _specs() -> dict:
    weight = P(None, "fsdp", None)
    blocks = {
        k: weight if k.startswith(("qkv", "proj", "fc")) else P()
        for k in ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")
    }
    return {"embed": P("fsdp", None), "blocks": blocks, "norm": P()}


ALIGNED = dict(params_partition_specs=_specs(), mesh_axis_sizes={"fsdp": SHARDS})
LAYOUTS = {
    # name: (options, whether the square-tile rule is patched in)
    "default (full-width tiles)": (dict(ALIGNED, block_size=BLOCK), False),
    "square tiles for thin shards": (dict(ALIGNED, block_size=BLOCK), True),
    "half block_size": (dict(ALIGNED, block_size=BLOCK // 2), False),
    "every leaf whole (follow_shards=False)": (dict(follow_shards=False, block_size=BLOCK), False),
}


def _state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def train(options: dict, lr: float, seed: int, steps: int, data: np.ndarray) -> dict:
    tx = wk.quad(
        lr, dtype=jnp.float32, preconditioner_init_scale=None, scanned_layers=SCANNED, **options
    )
    split = int(0.9 * len(data))
    train_tokens = batches(data[:split], steps, seed)
    valid_tokens = batches(data[split:], 16, 1000)
    params = init_params(jax.random.key(seed), **DIMS)
    state = tx.init(params)
    plan = state[0].plan.tree
    state, result = fit(tx, params, state, train_tokens, valid_tokens, DIMS["heads"])
    return {
        **result,
        "state_bytes": _state_bytes(state),
        "tile_shapes": sorted({(b.rows, b.cols) for b in plan.buckets}),
        "groups": len(plan.groups),
    }


def quality(steps: int, lrs: list[float], seeds: list[int]) -> list[dict]:
    data = np.frombuffer(stdlib_text(), np.uint8).astype(np.int32) % DIMS["vocab"]
    rows = []
    for lr in lrs:
        for seed in seeds:
            for name, (options, square) in LAYOUTS.items():
                patch = (
                    _patched(_layout, "leaf_plan", _square_tiles(_layout.leaf_plan))
                    if square
                    else contextlib.nullcontext()
                )
                with patch:
                    result = train(options, lr, seed, steps, data)
                rows.append({"part": "quality", "layout": name, "lr": lr, "seed": seed, **result})
                print(rows[-1], flush=True)
    # State against the whole layout's (one device), per lr and seed: the ratio a device
    # holds against its share on the mesh.
    blocks = {name: options["block_size"] for name, (options, _) in LAYOUTS.items()}
    whole = {block: _whole_state_bytes(block) for block in set(blocks.values())}
    for r in rows:
        r["state_over_share"] = r["state_bytes"] / whole[blocks[r["layout"]]]
    return rows


def _whole_state_bytes(block_size: int) -> int:
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), **DIMS))
    tx = wk.quad(1e-3, dtype=jnp.float32, scanned_layers=SCANNED, block_size=block_size)
    return _state_bytes(jax.eval_shape(tx.init, params))


# `grouping`


def _compile_s(step, *args) -> tuple[float, Any]:
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    return time.perf_counter() - start, compiled


def grouping(cases: list[str], quick: bool, repeats: int) -> list[dict]:
    dims = sizes(quick)
    block_size = 64 if quick else 256
    params = init_params(jax.random.key(0), **dims)
    tokens = jax.random.randint(
        jax.random.key(1), (dims["batch"], dims["context"] + 1), 0, dims["vocab"]
    )
    tx = wk.quad(
        1e-3, dtype=jnp.float32, weight_decay=0.0, block_size=block_size, scanned_layers=SCANNED
    )

    def step(params, state, tokens):
        grads = jax.grad(loss)(params, tokens, dims["heads"])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    choices = {"CPU grouping (default, budget 0.1)": _layout.CPU_GROUPING}
    choices["accelerator grouping (budget 1.0)"] = _layout.ACCELERATOR_GROUPING
    rows = []
    for case in cases:
        mesh_shape, layout = case.split(":")
        mesh = jax.make_mesh(tuple(int(x) for x in mesh_shape.split("x")), ("data", "fsdp"))
        specs = weight_specs(params, layout)
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
        for name, choice in choices.items():
            with _patched(_backend, "CPU_GROUPING", choice):
                state = tx.init(params)
                with jax.set_mesh(mesh):
                    p = jax.tree.map(put, params, specs)
                    sharded_state, data = tx.init(p), put(tokens, P("data"))
                groups = len(sharded_state[0].plan.tree.groups)
                # Interleaved, fastest of `repeats`: a slow spell of the machine hits both.
                one, sharded, compiled = [], [], None
                for _ in range(repeats):
                    one.append(_compile_s(step, params, state, tokens)[0])
                    with jax.set_mesh(mesh):
                        seconds, compiled = _compile_s(step, p, sharded_state, data)
                    sharded.append(seconds)
                assert compiled is not None
                with jax.set_mesh(mesh):
                    p, s = compiled(p, sharded_state, data)
                    times = []
                    for _ in range(5):
                        start = time.perf_counter()
                        p, s = jax.block_until_ready(compiled(p, s, data))
                        times.append(time.perf_counter() - start)
            rows.append(
                {
                    "part": "grouping",
                    "case": case,
                    "grouping": name,
                    "compute_groups": groups,
                    "compile_s": min(sharded),
                    "one_device_compile_s": min(one),
                    "compile_over_one_device": min(sharded) / min(one),
                    "step_s": statistics.median(times),
                }
            )
            print(rows[-1], flush=True)
    return rows


def add_arguments(parser):
    parser.add_argument("--parts", default="quality,grouping")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lrs", default="3e-3,1e-2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", default="2x4:rows,2x4:cols,2x4:2d,1x8:rows,1x8:cols")


def _quality_table(rows: list[dict]) -> str:
    lines = [
        "| layout | tile shapes | state / share | lr | validation loss (mean of seeds) "
        "| each seed |",
        "|---|---|---|---|---|---|",
    ]
    for lr in sorted({r["lr"] for r in rows}):
        for name in LAYOUTS:
            mine = [r for r in rows if r["lr"] == lr and r["layout"] == name]
            if not mine:
                continue
            losses = [r["valid_loss"] for r in mine]
            shapes = ", ".join(f"{a}x{b}" for a, b in mine[0]["tile_shapes"])
            lines.append(
                f"| {name} | {shapes} | {mine[0]['state_over_share']:.3f} | {lr:g} | "
                f"{np.mean(losses):.4f} | {', '.join(f'{x:.4f}' for x in losses)} |"
            )
    return "\n".join(lines)


def _grouping_table(rows: list[dict]) -> str:
    lines = [
        "| mesh, weights | grouping | compute groups | compile / one device's | step (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['grouping']} | {r['compute_groups']} | "
            f"{r['compile_over_one_device']:.2f} ({r['compile_s']:.2f} s / "
            f"{r['one_device_compile_s']:.2f} s) | {r['step_s']:.3f} |"
        )
    return "\n".join(lines)


def run(args):
    parts = args.parts.split(",")
    steps, lrs = args.steps, [float(x) for x in args.lrs.split(",")]
    seeds, cases, repeats = [int(x) for x in args.seeds.split(",")], args.cases.split(","), 3
    if args.quick:
        steps, lrs, seeds, cases, repeats = 20, lrs[:1], seeds[:1], cases[:1], 1
    rows = []
    # The timed part first, while nothing else has warmed or loaded the machine.
    if "grouping" in parts:
        rows += grouping(cases, args.quick, repeats)
    if "quality" in parts:
        rows += quality(steps, lrs, seeds)
    text = ""
    if "quality" in parts:
        text += "## Shrinking the state: the loss\n\n" + _quality_table(
            [r for r in rows if r["part"] == "quality"]
        )
    if "grouping" in parts:
        text += "\n\n## Fewer compute groups: compile and step time\n\n" + _grouping_table(
            [r for r in rows if r["part"] == "grouping"]
        )
    print("\n" + text)
    notes = (
        f"`quality`: {steps} steps of batch {BATCH} x {CONTEXT} characters, float32, "
        f"`preconditioner_init_scale=None`, seeds {', '.join(map(str, seeds))}; state / "
        "share: the state of the layout (one device, all shards) over the state of every "
        "leaf whole with the same `block_size`, i.e. what a device holds against its share "
        f"on a mesh of {SHARDS}. `grouping`: compile times are the fastest of {repeats}, "
        "caches cleared, the one-device and the sharded compile interleaved; the step is "
        "the median of 5 on the simulated mesh (8 devices on this machine's cores)."
    )
    write_results(args, rows, text.strip(), title="Shards thinner than block_size", notes=notes)
