"""`examples/fsdp.py`'s training on 8 devices as two processes of 4 simulated CPU devices
each (gloo collectives over localhost), or as one process of 8: run by
`test_two_processes.py`, which compares the two.

    python tests/_two_process.py worker PROCESS_ID PORT OUT_DIR
    python tests/_two_process.py single OUT_DIR [CHECKPOINT]

Each run trains `STEPS` steps from the same start on the same batches, saves the
optimizer state after `SAVE_AT` steps (process 0, gathered from both processes), and
writes its losses and final params as `.npz` in OUT_DIR. Given a checkpoint, the
single-process run restores it after `SAVE_AT` steps instead of keeping its own state.
"""

import os
import sys


MODE = sys.argv[1]
DEVICES = 4 if MODE == "worker" else 8
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={DEVICES}"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import importlib.util
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P


STEPS, SAVE_AT = 8, 4

if MODE == "worker":
    process_id, port, out = int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    checkpoint = None
else:
    process_id, out = 0, pathlib.Path(sys.argv[2])
    checkpoint = pathlib.Path(sys.argv[3]) if len(sys.argv) > 3 else None

# The example, imported after the processes have met (it builds its mesh on import).
_path = pathlib.Path(__file__).parent.parent / "examples" / "fsdp.py"
_spec = importlib.util.spec_from_file_location("fsdp_example", _path)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

import wkron_eqx as wk  # noqa: E402


def gathered(tree):
    """Every process's shards of `tree`, as one NumPy tree on every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def main():
    mesh = example.mesh
    data, rng = example.text(), np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        starts = rng.integers(0, len(data) - example.CONTEXT - 1, example.BATCH)
        batches.append(np.stack([data[s : s + example.CONTEXT + 1] for s in starts]))
    optimizer = wk.quad(
        learning_rate=3e-3,
        preconditioner_init_scale=None,
        scanned_layers={"embed": False, "blocks": True, "norm": False},
    )
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), example.SPECS)
    host_params = jax.tree.map(np.asarray, example.init_params(jax.random.key(0)))
    losses = []
    with jax.set_mesh(mesh):
        params = jax.device_put(host_params, shardings)
        state = optimizer.init(params)
        step = example.make_step(optimizer)
        for i, tokens in enumerate(batches):
            if i == SAVE_AT:
                saved = gathered(state)
                if process_id == 0:
                    np.savez(out / f"state_{MODE}.npz", *jax.tree.leaves(saved))
                if checkpoint is not None:
                    with np.load(checkpoint) as f:
                        leaves = [f[f"arr_{k}"] for k in range(len(f.files))]
                    like = jax.tree.leaves(state)
                    # (`.npz` keeps bfloat16 as raw 2-byte values: view them as what they were.)
                    restored = [
                        jax.device_put(x.view(y.dtype), y.sharding)
                        for x, y in zip(leaves, like, strict=True)
                    ]
                    state = jax.tree.unflatten(jax.tree.structure(state), restored)
            tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
            params, state, loss = step(params, state, tokens)
            losses.append(float(gathered(loss)))
        final = gathered(params)
        specs = {str(jax.typeof(d.Ql).sharding.spec) for d in state[0].dense}
    if process_id == 0:
        np.savez(out / f"run_{MODE}.npz", losses=np.array(losses), *jax.tree.leaves(final))
        (out / f"specs_{MODE}.txt").write_text("\n".join(sorted(specs)))
    print(MODE, process_id, jax.process_count(), jax.device_count(), losses, flush=True)


if __name__ == "__main__":
    main()
