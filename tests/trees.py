"""The parameter trees (shapes only) that the benchmarks time and the structure tests
trace, and `mixed(n)` for growth in the number of leaves: one definition for both.

A spec is `{"params": nested dict of shape tuples, "scanned": prefix tree of flags or
None}`; values are drawn per run (`materialise`) or left abstract (`abstract_tree`).
This module needs only NumPy and JAX, not `wkron_eqx`: the benchmarks also import it in
the reference's environment (`benchmarks/_harness.py`), where the package is absent.
"""

import jax
import jax.numpy as jnp
import numpy as np


def mlp() -> dict:
    """MLP 784-512-512-10 with biases."""
    sizes = [784, 512, 512, 10]
    tree = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        tree[f"w{i}"] = (a, b)
        tree[f"b{i}"] = (b,)
    return {"params": tree, "scanned": None}


def gpt() -> dict:
    """4 layers stacked on a scanned axis, d=256, vocab 8192, context 256."""
    d, layers, vocab, ctx = 256, 4, 8192, 256
    blocks = {
        "qkv": (layers, d, 3 * d),
        "proj": (layers, d, d),
        "fc1": (layers, d, 4 * d),
        "fc2": (layers, 4 * d, d),
        "norm1": (layers, d),
        "norm2": (layers, d),
    }
    params = {"blocks": blocks, "embed": (vocab, d), "pos": (ctx, d), "head": (d, vocab)}
    scanned = {"blocks": True, "embed": False, "pos": False, "head": False}
    return {"params": params, "scanned": scanned}


def conv() -> dict:
    """(3, 3, Cin, Cout) kernels for 3-32-64-128-256 with biases, and a 256x10 head."""
    channels = [3, 32, 64, 128, 256]
    tree = {}
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
        tree[f"conv{i}"] = (3, 3, a, b)
        tree[f"bias{i}"] = (b,)
    tree["head"] = (256, 10)
    tree["head_bias"] = (10,)
    return {"params": tree, "scanned": None}


def embedding() -> dict:
    """One 50000x128 embedding (above max_size_dense: a diagonal side and dense strips)."""
    return {"params": {"embed": (50000, 128)}, "scanned": None}


def transformer12() -> dict:
    """An unscanned 12-layer transformer, d=128: every layer has its own qkv, proj, fc1
    and fc2 weights and biases and two norms (scale and bias); 149 leaves."""
    d, layers, vocab, ctx = 128, 12, 8192, 256
    params = {"embed": (vocab, d), "pos": (ctx, d)}
    for i in range(layers):
        params[f"layer{i:02d}"] = {
            "qkv": {"w": (d, 3 * d), "b": (3 * d,)},
            "proj": {"w": (d, d), "b": (d,)},
            "fc1": {"w": (d, 4 * d), "b": (4 * d,)},
            "fc2": {"w": (4 * d, d), "b": (d,)},
            "norm1": {"scale": (d,), "bias": (d,)},
            "norm2": {"scale": (d,), "bias": (d,)},
        }
    params["final_norm"] = {"scale": (d,), "bias": (d,)}
    params["head"] = (d, vocab)
    return {"params": params, "scanned": None}


def resnet50() -> dict:
    """ResNet-50's layout (bottleneck stages of 3, 4, 6, 3 blocks, batch-norm scales
    and biases, a projection on each stage's first block) with channels divided by 4;
    161 leaves."""
    div = 4
    params = {
        "stem": {"conv": (7, 7, 3, 64 // div), "bn": {"scale": (64 // div,), "bias": (64 // div,)}}
    }
    width = 64 // div
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        mid //= div
        out = 4 * mid
        for block in range(blocks):
            b = {}
            for j, (shape, channels) in enumerate(
                [((1, 1, width, mid), mid), ((3, 3, mid, mid), mid), ((1, 1, mid, out), out)]
            ):
                b[f"conv{j}"] = shape
                b[f"bn{j}"] = {"scale": (channels,), "bias": (channels,)}
            if block == 0:
                b["proj"] = (1, 1, width, out)
                b["proj_bn"] = {"scale": (out,), "bias": (out,)}
            params[f"stage{stage}_block{block}"] = b
            width = out
    params["fc"] = {"w": (width, 1000), "b": (1000,)}
    return {"params": params, "scanned": None}


def gpt2_small() -> dict:
    """GPT-2 small's shapes: d=768, 12 layers stacked on a scanned axis, vocab 50257
    (tied head), context 1024; 124M parameters."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    blocks = {
        "qkv": {"w": (layers, d, 3 * d), "b": (layers, 3 * d)},
        "proj": {"w": (layers, d, d), "b": (layers, d)},
        "fc1": {"w": (layers, d, 4 * d), "b": (layers, 4 * d)},
        "fc2": {"w": (layers, 4 * d, d), "b": (layers, d)},
        "ln1": {"scale": (layers, d), "bias": (layers, d)},
        "ln2": {"scale": (layers, d), "bias": (layers, d)},
    }
    params = {
        "blocks": blocks,
        "wte": (vocab, d),
        "wpe": (ctx, d),
        "ln_f": {"scale": (d,), "bias": (d,)},
    }
    scanned = {"blocks": True, "wte": False, "wpe": False, "ln_f": False}
    return {"params": params, "scanned": scanned}


MIXED_SHAPES = (
    (64, 64),
    (256,),
    (3, 3, 16, 32),
    (128, 32),
    (64,),
    (1, 1, 32, 128),
    (96, 64),
    (128,),
)


def mixed(n: int) -> dict:
    """`n` leaves cycling through matrices, vectors and conv kernels (`MIXED_SHAPES`):
    the shapes repeat, as the layers of a real model do."""
    params = {f"leaf{i:03d}": MIXED_SHAPES[i % len(MIXED_SHAPES)] for i in range(n)}
    return {"params": params, "scanned": None}


TREES = {
    "mlp": mlp,
    "gpt": gpt,
    "conv": conv,
    "embedding": embedding,
    "transformer12": transformer12,
    "resnet50": resnet50,
    "gpt2_small": gpt2_small,
}


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def materialise(shapes, seed: int, scale: float = 1.0):
    """Random float32 NumPy arrays with the given (nested dict of) shapes."""
    rng = np.random.default_rng(seed)

    def build(node):
        if is_shape(node):
            return (scale * rng.standard_normal(node)).astype(np.float32)
        return {k: build(v) for k, v in node.items()}

    return build(shapes)


def broadcast_scanned(params_shapes, scanned):
    """A full tree of bools from a prefix tree (None -> all False)."""

    def build(node, flag):
        if is_shape(node):
            return bool(flag)
        return {k: build(v, flag[k] if isinstance(flag, dict) else flag) for k, v in node.items()}

    return build(params_shapes, scanned if scanned is not None else False)


def abstract_tree(spec: dict, dtype=jnp.float32):
    """`(params, scanned_layers)` of a spec: `jax.ShapeDtypeStruct` leaves (nothing is
    allocated) and the full tree of flags, or None when nothing is scanned."""

    def build(node):
        if is_shape(node):
            return jax.ShapeDtypeStruct(node, dtype)
        return {k: build(v) for k, v in node.items()}

    params = build(spec["params"])
    scanned = broadcast_scanned(spec["params"], spec["scanned"]) if spec["scanned"] else None
    return params, scanned
