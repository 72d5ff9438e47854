"""What the optimizer communicates and keeps when the weights are FSDP-sharded: per
training step, the bytes of every collective in the compiled step (optimized HLO), for
`optax.adamw` and `wk.quad` with the old layout (every leaf planned whole:
`follow_shards=False`) and the new one (each shard tiled on its own, the default), each
also with its stacks spread over the `data` replicas (ZeRO); the optimizer state the
fullest device holds; compile and step time on the simulated mesh; and the updates
against one device's.

The model is a small transformer (a tied embedding, scanned blocks of attention and
MLP, norms), its loss gathering each weight and its gradient coming back
reduce-scattered, on simulated CPU meshes `2 x 4` and `1 x 8` (`("data", "fsdp")`,
Explicit axes), the weights sharded by rows (`P("fsdp", None)` on the input side), by
columns, or on two axes (`P("fsdp", "data")`).

    python -m benchmarks fsdp_comm [--quick]

Writes `benchmarks/results/fsdp_comm.{json,md}`. `--quick`: a narrower model, the
`2 x 4` mesh by rows only.
"""

import os


# Eight simulated CPU devices: read when jax starts its backend, which nothing before
# `run` does (importing jax does not).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk
from tests.helpers import fullest_device_bytes

from ._harness import write_results


DESCRIPTION = "collective bytes, state per device and time with FSDP-sharded weights"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
STEPS = 3


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective produces in one run of the compiled module (the
    result shapes; a `-start`/`-done` pair counted once)."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        match = re.search(rf"= (.+?) ({'|'.join(COLLECTIVES)})(-start)?\(", line)
        if not match:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out[match.group(2)] += size * BYTES.get(dtype, 4)
    return out


# The model: sizes, parameters and loss.


def sizes(quick: bool) -> dict:
    if quick:
        return dict(vocab=512, d=128, layers=2, heads=2, context=32, batch=8)
    return dict(vocab=4096, d=768, layers=2, heads=6, context=64, batch=8)


def init_params(key, vocab: int, d: int, layers: int, **_) -> dict:
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)
    return {
        "embed": normal((vocab, d), 0.02),
        "blocks": {
            "qkv": normal((layers, d, 3 * d), d**-0.5),
            "proj": normal((layers, d, d), d**-0.5),
            "fc1": normal((layers, d, 4 * d), d**-0.5),
            "fc2": normal((layers, 4 * d, d), (4 * d) ** -0.5),
            "norm1": jnp.ones((layers, d)),
            "norm2": jnp.ones((layers, d)),
        },
        "norm": jnp.ones((d,)),
    }


def _norm(x, scale):
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def loss(params, tokens, heads: int):
    """Next-token cross-entropy; under a mesh every weight is gathered first (FSDP)."""
    sharded = not jax.sharding.get_abstract_mesh().empty
    if sharded:
        params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)
    x = params["embed"].at[tokens[:, :-1]].get(out_sharding=P("data") if sharded else None)
    batch, length, d = x.shape
    mask = jnp.tril(jnp.ones((length, length), bool))

    def block(x, w):
        q, k, v = jnp.split(_norm(x, w["norm1"]) @ w["qkv"], 3, axis=-1)
        split = lambda t: t.reshape(batch, length, heads, d // heads)
        logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(d // heads)
        attn = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", attn, split(v)).reshape(x.shape) @ w["proj"]
        return x + jax.nn.gelu(_norm(x, w["norm2"]) @ w["fc1"]) @ w["fc2"], None

    x, _ = jax.lax.scan(block, x, params["blocks"])
    logits = _norm(x, params["norm"]) @ params["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


LAYOUTS = {
    # Each weight's spec (without the scanned axis) and the embedding's.
    "rows": (P("fsdp", None), P("fsdp", None)),
    "cols": (P(None, "fsdp"), P(None, "fsdp")),
    "2d": (P("fsdp", "data"), P("fsdp", "data")),
}


def weight_specs(params: dict, layout: str) -> dict:
    weight, embed = LAYOUTS[layout]
    matrix = lambda w: P(None, *weight) if w.ndim == 3 else P()
    return {
        "embed": embed,
        "blocks": jax.tree.map(matrix, params["blocks"]),
        "norm": P(),
    }


def optimizers(block_size: int) -> dict:
    ours = dict(
        dtype=jnp.float32,
        weight_decay=0.0,
        block_size=block_size,
        scanned_layers={"embed": False, "blocks": True, "norm": False},
    )
    return {
        "adamw": lambda **_: optax.adamw(1e-3),
        "quad, old layout": lambda **_: wk.quad(1e-3, follow_shards=False, **ours),
        "quad, old layout, ZeRO": lambda **_: wk.quad(
            1e-3,
            follow_shards=False,
            pipeline_axis_name=("data", "fsdp"),
            pipeline_axis_size=8,
            **ours,
        ),
        # `**aligned`: on one device, the same shard-aligned layout (`mesh_axis_sizes`).
        "quad": lambda **aligned: wk.quad(1e-3, **ours, **aligned),
        "quad, ZeRO over data": lambda **aligned: wk.quad(
            1e-3, pipeline_axis_name="data", pipeline_axis_size=2, **ours, **aligned
        ),
        # Half the block: shards narrower than `block_size` keep a factor of the
        # unsharded side per shard; smaller blocks shrink it.
        "quad, half block_size": lambda **aligned: wk.quad(
            1e-3, **(ours | dict(block_size=block_size // 2)), **aligned
        ),
    }


def _cosines(a, b) -> list[float]:
    out = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.ravel(np.asarray(x, np.float64)), np.ravel(np.asarray(y, np.float64))
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-300)))
    return out


def _state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def _shards(specs: dict, mesh) -> int:
    """How many shards the weights are cut into (the most any leaf has)."""
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))
    count = lambda spec: math.prod(
        size[n] for entry in spec if entry for n in ((entry,) if isinstance(entry, str) else entry)
    )
    return max(count(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def _compiled(step, *args, repeats: int = 3):
    """The compiled step and its fastest compile time of `repeats` (the in-memory
    caches cleared before each, so each is a compile)."""
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        compiled = jax.jit(step).lower(*args).compile()
        times.append(time.perf_counter() - start)
    return compiled, min(times)


def _step_time(compiled, *args) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def run_case(mesh_shape: tuple[int, int], layout: str, names: list[str], quick: bool) -> list[dict]:
    dims = sizes(quick)
    block_size = 64 if quick else 256
    params = init_params(jax.random.key(0), **dims)
    batches = [
        jax.random.randint(
            jax.random.key(i + 1), (dims["batch"], dims["context"] + 1), 0, dims["vocab"]
        )
        for i in range(STEPS)
    ]
    grad_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"))
    specs = weight_specs(params, layout)
    shards = _shards(specs, mesh)
    rows = []
    for name, make in optimizers(block_size).items():
        if name not in names:
            continue
        tx = make()

        def step(params, state, tokens):
            grads = jax.grad(loss)(params, tokens, dims["heads"])
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        # One device: the reference updates, the whole state, the unsharded compile.
        p, state = params, tx.init(params)
        single_bytes = _state_bytes(state)
        compiled, single_compile = _compiled(step, p, state, batches[0])
        single = []
        for tokens in batches:
            p, state, u = compiled(p, state, tokens)
            single.append(u)
        # One device, the layout of the sharded run.
        sizes_ = dict(zip(mesh.axis_names, mesh.axis_sizes))
        aligned_tx = make(params_partition_specs=specs, mesh_axis_sizes=sizes_)
        p, state, aligned = params, aligned_tx.init(params), []
        for tokens in batches:
            grads = jax.grad(loss)(p, tokens, dims["heads"])
            u, state = jax.jit(aligned_tx.update)(grads, state, p)
            p = optax.apply_updates(p, u)
            aligned.append(u)
        with jax.set_mesh(mesh):
            put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
            p = jax.tree.map(put, params, specs)
            state = tx.init(p)
            data = lambda t: put(t, P("data"))
            compiled, compile_s = _compiled(step, p, state, data(batches[0]))
            cosines, same_layout = [], []
            for tokens, want, alike in zip(batches, single, aligned, strict=True):
                p, state, u = compiled(p, state, data(tokens))
                cosines += _cosines(u, want)
                same_layout += _cosines(u, alike)
            step_s = _step_time(compiled, p, state, data(batches[0]))
            fullest = fullest_device_bytes(state)
        comm = collective_bytes(compiled.as_text())
        rows.append(
            {
                "mesh": f"{mesh_shape[0]} x {mesh_shape[1]}",
                "layout": layout,
                "optimizer": name,
                "collective_bytes": comm,
                "bytes_over_grad": sum(comm.values()) / grad_bytes,
                "state_per_device_bytes": int(fullest),
                "single_device_state_bytes": int(single_bytes),
                "shards": shards,
                "state_per_device_over_single_per_shard": fullest / (single_bytes / shards),
                "compile_s": compile_s,
                "single_device_compile_s": single_compile,
                "compile_over_single": compile_s / single_compile,
                "step_s": step_s,
                "min_cosine_vs_one_device": min(cosines),
                "min_cosine_vs_one_device_same_layout": min(same_layout),
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "collective_bytes"}, flush=True)
    adamw = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        total = sum(r["collective_bytes"].values())
        r["bytes_over_adamw"] = total / sum(adamw["collective_bytes"].values()) if adamw else None
    return rows


def add_arguments(parser):
    parser.add_argument(
        "--cases",
        default="2x4:rows,2x4:cols,2x4:2d,1x8:rows,1x8:cols",
        help="comma-separated MESH:LAYOUT, MESH as RxC, LAYOUT one of rows, cols, 2d",
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| mesh | weights | optimizer | bytes / gradient | bytes / adamw's | state per "
        "device / (one device's / shards) | compile / one device's | step (s) | min "
        "cosine vs one device | same, shard-aligned layout on one device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        weight, _ = LAYOUTS[r["layout"]]
        lines.append(
            f"| {r['mesh']} | `{weight}` | {r['optimizer']} | {r['bytes_over_grad']:.2f} | "
            f"{r['bytes_over_adamw']:.2f} | "
            f"{r['state_per_device_over_single_per_shard']:.2f} | "
            f"{r['compile_over_single']:.2f} | {r['step_s']:.3f} | "
            f"{r['min_cosine_vs_one_device']:.6f} | "
            f"{r['min_cosine_vs_one_device_same_layout']:.6f} |"
        )
    return "\n".join(lines)


def run(args):
    cases = [c.split(":") for c in args.cases.split(",")]
    names = list(optimizers(256))
    if args.quick:
        cases = [["2x4", "rows"]]
    rows = []
    for mesh, layout in cases:
        shape = tuple(int(n) for n in mesh.split("x"))
        rows += run_case(shape, layout, names, args.quick)  # pyright: ignore
    text = table(rows)
    print("\n" + text)
    dims = sizes(args.quick)
    notes = (
        f"A transformer (vocab {dims['vocab']}, d={dims['d']}, {dims['layers']} scanned "
        f"blocks, tied embedding), batch {dims['batch']} x {dims['context']} tokens split "
        'over `data`, on simulated CPU meshes (`("data", "fsdp")`, Explicit axes), '
        f"float32, {STEPS} steps. Bytes: the result shapes of each collective in the "
        "compiled training step (the loss's gathers of the weights and reduce-scatters "
        "of the gradients included). State: the optimizer state on the fullest device, "
        "against the whole state on one device divided by the number of shards of the "
        "weights. Compile: the sharded step's against the same step on one device (each the "
        "fastest of 3 compiles, caches cleared). The "
        "cosines compare each leaf's update with one device's over the steps (the new "
        "layout computes a one-device run of the shard-aligned layout; where each shard "
        "holds whole tiles, that is the unsharded layout's)."
    )
    write_results(args, rows, text, title="FSDP: communication and state", notes=notes)
