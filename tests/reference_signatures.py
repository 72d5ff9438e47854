"""The reference's (eformer 0.0.101's `white_kron`) factory signatures: names, order and
defaults; and the arguments added after them with their defaults, which keep the
reference's behaviour."""

import jax.numpy as jnp


SCALE_BY_REFERENCE = [
    ("lr_style", "adam"),
    ("b1", 0.95),
    ("normalize_grads", False),
    ("max_size_dense", 16384),
    ("preconditioner_lr", 0.7),
    ("preconditioner_init_scale", 1.0),
    ("dtype", jnp.bfloat16),
    ("scanned_layers", None),
    ("block_size", 256),
    ("pipeline_axis_name", None),
    ("pipeline_axis_size", 1),
    ("params_partition_specs", None),
    ("noise_scale", 1e-9),
]
OPTIMIZER_REFERENCE = [
    ("learning_rate", 0.001),
    ("lr_style", "adam"),
    ("b1", 0.95),
    ("weight_decay", 0.1),
    ("weight_decay_mask", None),
    *SCALE_BY_REFERENCE[2:],
]
ADDED = {
    "preconditioner_update_probability": 1.0,
    "matmul_dtype": None,
    "memory_save_mode": None,
    "stochastic_rounding": False,
    "cache_preconditioner": False,
    "damping": 0.0,
    # On one device, or with unsharded params, the reference's layout; with sharded
    # params each shard is tiled on its own (the reference has no such layout).
    "follow_shards": True,
    "mesh_axis_sizes": None,
}
