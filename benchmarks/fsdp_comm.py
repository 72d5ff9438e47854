"""What the optimizer communicates when the weights are FSDP-sharded: the bytes of every
collective in the compiled training step (optimized HLO), per step, for `optax.adamw`
and `wk.quad`, on a simulated `2 x 4` CPU mesh with Explicit axes; and the
optimizer-state bytes each device holds. Also checks that the sharded run computes the
single-device updates (cosine per leaf over 3 steps).

    python -m benchmarks fsdp_comm

Writes `benchmarks/results/fsdp_comm.{json,md}` and prints a markdown table. `--quick`:
the row-sharded layout, sgd and quad only.
"""

import os


# Eight simulated CPU devices: read when jax starts its backend, which nothing before
# `run` does (importing jax does not).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk

from ._harness import write_results


DESCRIPTION = "the bytes each collective moves with FSDP-sharded weights, adamw against quad"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
WIDTH, DEPTH, BATCH = 512, 3, 64


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


def _model(key):
    return eqx.nn.MLP(WIDTH, WIDTH, width_size=WIDTH, depth=DEPTH, key=key)


def _loss(params, static, x, y):
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _weight_specs(params, layout: str):
    """`P(fsdp, None)` (rows sharded) or `P(None, model)` (columns) for every weight
    matrix, biases replicated."""
    spec = P("fsdp", None) if layout == "rows" else P(None, "fsdp")
    return jax.tree.map(lambda x: spec if x.ndim == 2 else P(), params)


def _cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _optimizers() -> dict:
    ours = dict(learning_rate=1e-3, dtype=jnp.float32, weight_decay=0.0)
    return {
        # The training step with the simplest update: the gradient's own communication.
        "sgd": optax.sgd(1e-3),
        "adamw": optax.adamw(1e-3),
        "quad": wk.quad(**ours),
        "quad, stacks over (data, fsdp)": wk.quad(
            pipeline_axis_name=("data", "fsdp"), pipeline_axis_size=8, **ours
        ),
    }


def run_layout(layout: str, names) -> list[dict]:
    params, static = eqx.partition(_model(jax.random.key(0)), eqx.is_inexact_array)
    key = jax.random.key(1)
    batches = [
        (jax.random.normal(jax.random.fold_in(key, i), (BATCH, WIDTH)),) * 2 for i in range(3)
    ]
    grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rows = []
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    for name, tx in _optimizers().items():
        if name not in names:
            continue

        def step(params, state, x, y):
            grads = jax.grad(_loss)(params, static, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        single_state, single = tx.init(params), []
        p = params
        for x, y in batches:
            p, single_state, u = jax.jit(step)(p, single_state, x, y)
            single.append(u)
        with jax.set_mesh(mesh):
            specs = _weight_specs(params, layout)
            p = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
            state = tx.init(p)
            place = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
            compiled = jax.jit(step).lower(p, state, *place(batches[0])).compile()
            cosines = []
            for (x, y), want in zip(batches, single, strict=True):
                p, state, u = compiled(p, state, *place((x, y)))
                cosines += [
                    _cosine(a, b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want))
                ]
            per_device = max(
                sum(
                    s.data.nbytes
                    for x in jax.tree.leaves(state)
                    for s in x.addressable_shards
                    if s.device == d
                )
                for d in jax.devices()
            )
        comm = collective_bytes(compiled.as_text())
        rows.append(
            {
                "layout": layout,
                "optimizer": name,
                "collective_bytes": comm,
                "total_over_grad": sum(comm.values()) / grad_bytes,
                "state_bytes_per_device": int(per_device),
                "state_per_device_over_params": per_device / grad_bytes,
                "min_cosine": min(cosines),
            }
        )
        print(rows[-1], flush=True)
    return rows


def add_arguments(parser):
    parser.add_argument("--layouts", default="rows,cols", help="rows: P(fsdp, None); cols")


def run(args):
    layouts, names = args.layouts.split(","), list(_optimizers())
    if args.quick:
        layouts, names = ["rows"], ["sgd", "quad"]
    rows = [row for layout in layouts for row in run_layout(layout, names)]
    lines = [
        "| weights | optimizer | "
        + " | ".join(COLLECTIVES)
        + " | total / gradient | state per device / params | min cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["collective_bytes"]
        layout = 'P("fsdp", None)' if r["layout"] == "rows" else 'P(None, "fsdp")'
        mb = lambda v: f"{v / 2**20:.2f} MiB"
        lines.append(
            f"| {layout} | {r['optimizer']} | "
            + " | ".join(mb(c[k]) for k in COLLECTIVES)
            + f" | {r['total_over_grad']:.2f} | {r['state_per_device_over_params']:.2f} "
            + f"| {r['min_cosine']:.6f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    notes = (
        f"An Equinox MLP ({DEPTH + 1} weights of {WIDTH} x {WIDTH} with biases), batch "
        f'{BATCH} split over `data`, on a simulated `2 x 4` CPU mesh (`("data", "fsdp")`, '
        "Explicit axes). Bytes are the result shapes of each collective in the compiled "
        "training step, per step."
    )
    write_results(args, rows, text, title="Communication with FSDP-sharded weights", notes=notes)
