"""Run as a script with 4 simulated CPU devices (`test_collectives` starts it): the
collectives of a jitted step whose factor stacks are sharded over a pipeline axis, as
JSON on stdout. Per configuration: for each collective op kind, how many there are and
how many elements they move, and the params' element count to compare with."""

import json
import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import jax
import jax.numpy as jnp
from helpers import collectives  # (run as a script: `tests/` is on the path)
from jax.sharding import AxisType

import wkron_eqx as wk


# Every kind: dense leaves of several tiles, a large leaf, a vector, a scanned stack.
SHAPES = {"w": (96, 80), "w2": (40, 24), "e": (300, 24), "b": (80,), "st": (4, 16, 16)}
CONFIGS = {
    "quad": dict(),
    "skew_p05_cache": dict(preconditioner_update_probability=0.5, cache_preconditioner=True),
    "quad_init_none": dict(preconditioner_init_scale=None),
}


def main():
    mesh = jax.make_mesh((4,), ("pp",), axis_types=(AxisType.Auto,))
    params = {k: jnp.ones(s, jnp.float32) for k, s in SHAPES.items()}
    scanned = {k: k == "st" for k in SHAPES}
    report = {"param_elements": sum(x.size for x in params.values())}
    for name, options in CONFIGS.items():
        make = wk.skew if name.startswith("skew") else wk.quad
        tx = make(
            dtype=jnp.float32,
            block_size=32,
            max_size_dense=128,
            scanned_layers=scanned,
            pipeline_axis_name="pp",
            pipeline_axis_size=4,
            **options,
        )
        with jax.set_mesh(mesh):
            state = jax.jit(tx.init)(params)
            text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
        report[name] = collectives(text)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
