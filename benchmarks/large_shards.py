"""A large leaf's dense side under FSDP: a factor per shard, or one factor for the whole
side (whose statistics, on a mesh, would be summed over the shards)? The two choices on
a char-LM's loss, each run on one device through `mesh_axis_sizes` (the same maths as
on a mesh of 4 `fsdp` shards), with the old whole-leaf layout for reference.

The model is `fsdp_comm`'s transformer, narrow (d=64, vocab 512, `max_size_dense=256`)
so that the embedding is a large leaf (a diagonal factor for its 512 rows, dense strips
for its 64 columns) and every other weight is dense; trained on standard-library source
text (`curves.stdlib_text`), weights sharded by rows over 4 `fsdp` shards.

    python -m benchmarks large_shards [--quick]

Writes `benchmarks/results/large_shards.{json,md}`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import wkron_eqx as wk

from ._harness import write_results
from .curves import stdlib_text
from .fsdp_comm import init_params, loss


DESCRIPTION = "a large leaf's dense side under FSDP: a factor per shard or one shared"
DIMS = dict(vocab=512, d=64, layers=2, heads=2)
CONTEXT, BATCH, SHARDS = 64, 16, 4


def _specs(embed: P) -> dict:
    weight = P(None, "fsdp", None)
    blocks = {k: weight if k.startswith(("qkv", "proj", "fc")) else P() for k in _BLOCKS}
    return {"embed": embed, "blocks": blocks, "norm": P()}


_BLOCKS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")

CHOICES = {
    "a factor per shard (the layout)": dict(
        params_partition_specs=_specs(P("fsdp", None)), mesh_axis_sizes={"fsdp": SHARDS}
    ),
    "one factor for the whole side": dict(
        params_partition_specs=_specs(P()), mesh_axis_sizes={"fsdp": SHARDS}
    ),
    "every leaf whole (follow_shards=False)": dict(follow_shards=False),
}


def batches(data: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` batches of `BATCH` windows of `CONTEXT + 1` tokens of `data`, at random."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - CONTEXT - 1, (count, BATCH))
    return np.stack([[data[s : s + CONTEXT + 1] for s in row] for row in starts])


def train(choice: dict, train_tokens: np.ndarray, valid_tokens: np.ndarray, lr: float) -> dict:
    tx = wk.quad(
        lr,
        dtype=jnp.float32,
        max_size_dense=256,
        preconditioner_init_scale=None,
        scanned_layers={"embed": False, "blocks": True, "norm": False},
        **choice,
    )
    params = init_params(jax.random.key(0), **DIMS)
    state = tx.init(params)
    kinds = {path: leaf.kind for path, leaf in zip(state[0].plan.paths, state[0].leaf_states())}
    assert kinds["['embed']"] == wk.LARGE_PATH
    return fit(tx, params, state, train_tokens, valid_tokens, DIMS["heads"])[1]


def fit(tx, params, state, train_tokens, valid_tokens, heads: int) -> tuple[object, dict]:
    """Train `params` from `state` on each batch of `train_tokens` in turn (`loss`);
    return the final state, the mean training loss of the last 20 steps and the mean
    loss on `valid_tokens`."""

    @jax.jit
    def step(params, state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens, heads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    evaluate = jax.jit(lambda p, t: loss(p, t, heads))
    losses = []
    for tokens in train_tokens:
        params, state, value = step(params, state, tokens)
        losses.append(float(value))
    valid = float(np.mean([evaluate(params, t) for t in valid_tokens]))
    return state, {"train_loss_last_20": float(np.mean(losses[-20:])), "valid_loss": valid}


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lrs", default="3e-3,1e-2")


def run(args):
    data = np.frombuffer(stdlib_text(), np.uint8).astype(np.int32) % DIMS["vocab"]
    split = int(0.9 * len(data))
    steps, lrs = args.steps, [float(x) for x in args.lrs.split(",")]
    if args.quick:
        steps, lrs = 30, lrs[:1]
    train_tokens = batches(data[:split], steps, 0)
    valid_tokens = batches(data[split:], 8, 1)
    rows = []
    for lr in lrs:
        for name, choice in CHOICES.items():
            result = train(choice, train_tokens, valid_tokens, lr)
            rows.append({"choice": name, "lr": lr, "steps": steps, **result})
            print(rows[-1], flush=True)
    strip = DIMS["d"]
    lines = [
        "| dense side of the embedding | lr | training loss (last 20 steps) | validation loss |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['choice']} | {r['lr']:g} | {r['train_loss_last_20']:.4f} | {r['valid_loss']:.4f} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print("\n" + text)
    notes = (
        f"{steps} steps of batch {BATCH} x {CONTEXT} characters, float32, one seed, "
        f"`preconditioner_init_scale=None`; the embedding ({DIMS['vocab']} x {DIMS['d']}) "
        f"in {SHARDS} row shards. On a mesh, a factor per shard moves no bytes (the "
        "`fsdp_comm` table); one shared factor would all-reduce its statistics, a "
        f"{strip} x {strip} matrix ({strip * strip * 4 / 1024:.0f} KiB in float32) per "
        "strip and per statistic on every step, and keep the whole factor on every device."
    )
    write_results(args, rows, text, title="A large leaf's dense side under FSDP", notes=notes)
