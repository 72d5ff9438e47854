"""Train a small character-level transformer FSDP-style on 8 devices with `wk.quad`.

Every weight matrix is sharded over the `fsdp` axis of a `2 x 4` mesh (JAX's default
Explicit axes) and the batch over `data`. The loss gathers each weight and the gradient
comes back reduce-scattered, as in any FSDP step; the optimizer reads each weight's
sharding from its type and tiles each shard on its own, so the Kronecker factors of a
shard live on the devices that hold it and its step runs there. The script trains on
the source text of a few standard-library modules, then prints where the factors live
and what one training step communicates, against the same step with AdamW.

Run: `python examples/fsdp.py [--steps N]` (simulates 8 CPU devices; about a minute).
"""

import os


# Simulate 8 devices on the CPU; drop this line on a machine with 8 accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import importlib
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import wkron_eqx as wk


VOCAB, D, LAYERS, HEADS, CONTEXT, BATCH = 128, 128, 2, 4, 64, 16

mesh = jax.make_mesh((2, 4), ("data", "fsdp"))  # Explicit axes, JAX's default


def text() -> np.ndarray:
    """ASCII source text of a few standard-library modules (no download)."""
    sources = [
        inspect.getsource(importlib.import_module(name))
        for name in ("json.decoder", "json.encoder", "textwrap", "string")
    ]
    data = np.frombuffer("\n".join(sources).encode("ascii", "replace"), np.uint8)
    return np.minimum(data, VOCAB - 1).astype(np.int32)


def init_params(key) -> dict:
    keys = iter(jax.random.split(key, 6))
    normal = lambda shape, std: std * jax.random.normal(next(keys), shape)
    return {
        "embed": normal((VOCAB, D), 0.02),
        "blocks": {  # stacked on a leading layer axis, run by `lax.scan`
            "qkv": normal((LAYERS, D, 3 * D), D**-0.5),
            "proj": normal((LAYERS, D, D), D**-0.5 / LAYERS),
            "fc1": normal((LAYERS, D, 4 * D), D**-0.5),
            "fc2": normal((LAYERS, 4 * D, D), (4 * D) ** -0.5 / LAYERS),
            "norm1": jnp.ones((LAYERS, D)),
            "norm2": jnp.ones((LAYERS, D)),
        },
        "norm": jnp.ones((D,)),
    }


# FSDP: each matrix sharded along its input dimension over `fsdp`; the norms replicated.
SPECS = {
    "embed": P("fsdp", None),
    "blocks": {
        "qkv": P(None, "fsdp", None),
        "proj": P(None, "fsdp", None),
        "fc1": P(None, "fsdp", None),
        "fc2": P(None, "fsdp", None),
        "norm1": P(),
        "norm2": P(),
    },
    "norm": P(),
}


def rms_norm(x, scale):
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def loss_fn(params, tokens):
    params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)  # gather
    x = params["embed"].at[tokens[:, :-1]].get(out_sharding=P("data"))
    batch, length, _ = x.shape
    causal = jnp.tril(jnp.ones((length, length), bool))

    def block(x, w):
        q, k, v = jnp.split(rms_norm(x, w["norm1"]) @ w["qkv"], 3, axis=-1)
        heads = lambda t: t.reshape(batch, length, HEADS, D // HEADS)
        scores = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) * (D // HEADS) ** -0.5
        attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, heads(v)).reshape(x.shape)
        x = x + mixed @ w["proj"]
        return x + jax.nn.gelu(rms_norm(x, w["norm2"]) @ w["fc1"]) @ w["fc2"], None

    x, _ = jax.lax.scan(block, x, params["blocks"])
    logits = rms_norm(x, params["norm"]) @ params["embed"].T  # tied
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(optimizer):
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


COLLECTIVES = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"


def communicated(compiled) -> dict[str, float]:
    """MiB each kind of collective produces in one run of a compiled step."""
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1}
    out: dict[str, float] = {}
    for line in compiled.as_text().splitlines():
        op = re.search(rf"= (.+?) ({COLLECTIVES})(-start)?\(", line)
        if op:
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1)):
                elements = np.prod([int(d) for d in dims.split(",") if d]) if dims else 1
                out[op.group(2)] = out.get(op.group(2), 0) + elements * sizes.get(dtype, 4) / 2**20
    return out


def main(steps: int):
    data = text()
    rng = np.random.default_rng(0)

    def batch():
        starts = rng.integers(0, len(data) - CONTEXT - 1, BATCH)
        tokens = np.stack([data[s : s + CONTEXT + 1] for s in starts])
        return jax.device_put(tokens, NamedSharding(mesh, P("data")))

    optimizer = wk.quad(
        learning_rate=3e-3,
        preconditioner_init_scale=None,
        scanned_layers={"embed": False, "blocks": True, "norm": False},
    )
    with jax.set_mesh(mesh):
        params = jax.device_put(
            init_params(jax.random.key(0)), jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
        )
        opt_state = optimizer.init(params)
        step = make_step(optimizer)
        for i in range(1, steps + 1):
            params, opt_state, loss = step(params, opt_state, batch())
            if i == 1 or i % 20 == 0 or i == steps:
                print(f"step {i:4d}  loss {float(loss):.3f}")

        print("\nwhere the factors live (spec of each stack; the entries each device holds):")
        state = opt_state[0]
        for i, bucket in enumerate(state.dense):
            shard = bucket.Ql.addressable_shards[0].data.shape[0]
            print(
                f"  dense bucket {i}: {bucket.Ql.shape[0]} tiles of {bucket.Ql.shape[1]} x "
                f"{bucket.Qr.shape[1]}, {jax.typeof(bucket.Ql).sharding.spec}, {shard} per device"
            )
        for path, leaf in zip(state.plan.paths, state.leaf_states()):
            if leaf.kind == wk.LARGE_PATH:
                print(f"  large leaf {path}: {jax.typeof(leaf.Ql).sharding.spec}")

        print("\nwhat one training step communicates (MiB per step):")
        x = batch()
        for name, tx in {"adamw": optax.adamw(3e-3), "quad": optimizer}.items():
            state = tx.init(params)
            compiled = make_step(tx).lower(params, state, x).compile()
            moved = communicated(compiled)
            print(
                f"  {name:5s}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in sorted(moved.items()))
                + f"  (total {sum(moved.values()):.3f})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
