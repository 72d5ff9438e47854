"""The parameter trees every benchmark uses (shapes only; values are drawn per run)."""

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


TREES = {"mlp": mlp, "gpt": gpt, "conv": conv, "embedding": embedding}


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
