# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Anatomy: how a parameter tree is classified and tiled
#
# Each leaf is merged to at most two dims and given a *kind*:
#
# - **dense** (`wk.DENSE_PATH`): both sides at most `max_size_dense`. The matrix is cut
#   into tiles of at most `block_size x block_size`; each tile has a left factor `Ql`
#   and a right factor `Qr`. Tiles are *right-sized*: a tile whose valid size is
#   `r x c` is stored as `r' x c'`, each side rounded up to a multiple of 8, not as a
#   full block. Tiles of equal stored size from all leaves share one `DenseState`
#   bucket, updated by one `vmap`.
# - **large** (`wk.LARGE_PATH`): a side longer than `max_size_dense` gets a diagonal
#   factor; the other side, if short, is cut into strips with a dense factor each.
# - **one-d** (`wk.ONE_D_PATH`): vectors and scalars get one diagonal factor.
#
# A scanned leaf (`scanned_layers`) is a stack of independent layers, each with its
# own factors. The plan is pure Python on static shapes: `wk.tree_plan(params,
# **kwargs)` returns it without running anything (`init` stores the same plan in the
# state, as `state.plan.tree`).

# %%
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from matplotlib.colors import SymLogNorm
from matplotlib.patches import Rectangle
from sklearn.datasets import load_digits

import wkron_eqx as wk
from wkron_eqx import LeafKind


params = {
    "conv": jnp.zeros((3, 3, 5, 30)),  # a conv kernel, merged to 45 x 30
    "dense": jnp.zeros((150, 100)),
    "embed": jnp.zeros((1000, 90)),  # 1000 > max_size_dense: diagonal rows, strips
    "bias": jnp.zeros((100,)),
    "layers": jnp.zeros((3, 40, 40)),  # a scanned stack of 3 layers
}
scanned = {k: k == "layers" for k in params}
config = dict(block_size=64, max_size_dense=512, scanned_layers=scanned)

names = sorted(params)  # the flattening order of a dict
plan = wk.tree_plan(params, **config)
leaves = dict(zip(names, plan.leaves))


# %% [markdown]
# Every tile or strip of one layer as `(row, col, stored rows, stored cols)`; from
# these, the share of the stored tile area that is padding (what
# `preconditioner_stats` calls `padding_fraction`). A dense tile stored as
# `r' x c'` costs `r'^2 + c'^2` factor entries; in the reference every tile costs
# `2 * block_size^2`.


# %%
def tiles(leaf):
    """(row, col, stored rows, stored cols) of every tile/strip of one layer."""
    if leaf.kind == LeafKind.ONE_D:
        return [(0, 0, leaf.merged[0], 1)]
    rows, cols = leaf.merged
    if leaf.kind == LeafKind.DENSE:
        return [
            (
                g.row_part.start + i * g.row_part.size,
                g.col_part.start + j * g.col_part.size,
                *g.bucket,
            )
            for g in leaf.layout.groups
            for i in range(g.row_part.count)
            for j in range(g.col_part.count)
        ]
    if leaf.kind == LeafKind.LARGE and not leaf.layout.diag_right:
        return [
            (0, p.start + j * p.size, rows, leaf.layout.strip_side)
            for p in leaf.layout.col_parts
            for j in range(p.count)
        ]
    if leaf.kind == LeafKind.LARGE and not leaf.layout.diag_left:
        return [
            (p.start + i * p.size, 0, leaf.layout.strip_side, cols)
            for p in leaf.layout.row_parts
            for i in range(p.count)
        ]
    return [(0, 0, rows, cols)]


def padding(leaf):
    rows, cols = leaf.merged if len(leaf.merged) == 2 else (leaf.merged[0], 1)
    stored = sum(h * w for _, _, h, w in tiles(leaf))
    return 1 - rows * cols / stored


print(f"{'leaf':>7} {'shape':>14} {'merged':>10} {'kind':>6} {'tiles':>5} {'padding':>8}")
for name, leaf in leaves.items():
    print(
        f"{name:>7} {str(params[name].shape):>14} {str(leaf.merged):>10} "
        f"{leaf.kind.name:>6} {leaf.batch * len(tiles(leaf)):>5} {padding(leaf):>8.1%}"
    )
print("\ndense buckets (stored rows x cols: tiles):")
for bucket in plan.buckets:
    owners = ", ".join(f"{names[seg.leaf]} x{seg.count}" for seg in bucket.segments)
    print(f"  {bucket.rows:>3} x {bucket.cols:<3}: {bucket.valid_count:>2}  ({owners})")

# %% [markdown]
# Each leaf's merged matrix (one layer of a scanned stack), to scale. Every tile or
# strip is drawn at its stored size from its origin: real data in blue (alternating
# shades), padding in red. The dotted squares are the `block_size x block_size`
# tiles the reference would store for the edge tiles.

# %%
drawn = [n for n, leaf in leaves.items() if leaf.kind != LeafKind.ONE_D]
fig, axes = plt.subplots(1, len(drawn), figsize=(3.2 * len(drawn), 3.8))
bs = config["block_size"]
for ax, name in zip(axes, drawn):
    leaf = leaves[name]
    rows, cols = leaf.merged
    for k, (r0, c0, h, w) in enumerate(tiles(leaf)):
        if leaf.kind == LeafKind.DENSE and (h < bs or w < bs):
            ax.add_patch(Rectangle((c0, r0), bs, bs, fill=False, ls=":", ec="0.4"))
        ax.add_patch(Rectangle((c0, r0), w, h, fc="tab:red", alpha=0.6))
        vh, vw = min(h, rows - r0), min(w, cols - c0)
        shade = ("tab:blue", "lightsteelblue")[k % 2]
        ax.add_patch(Rectangle((c0, r0), vw, vh, fc=shade))
        ax.add_patch(Rectangle((c0, r0), w, h, fill=False, ec="k", lw=0.8))
    ax.add_patch(Rectangle((0, 0), cols, rows, fill=False, ec="k", lw=2.0))
    ax.set_xlim(-2, max(cols, bs) + 4)
    ax.set_ylim(max(rows, bs) + 4, -2)
    ax.set_aspect("auto" if rows > 4 * cols else "equal")
    ax.set_title(
        f"{name}: {rows} x {cols}\n{leaf.kind.name}, tiles/layer: {len(tiles(leaf))}, "
        f"{padding(leaf):.0%} padding",
        fontsize=9,
    )
    ax.tick_params(labelsize=7)
fig.tight_layout()

# %% [markdown]
# `wk.preconditioner_stats` reads the same numbers (and the Lipschitz estimates and
# RMS singular value of every factor) from an optimizer state, also inside `jit`. At
# `init` every factor is the identity, of RMS singular value 1:

# %%
stats = jax.jit(wk.preconditioner_stats)(wk.scale_by_skew(**config).init(params))
for name in ["conv", "dense", "layers"]:
    s = stats[name]
    kind, n, pad = int(s["kind"]), int(s["tiles"]), float(s["padding_fraction"])
    rms = s["rms_left"]
    print(f"{name:>7}: kind {kind}, {n} tiles, padding {pad:.1%}, rms(Ql) {rms}")

# %% [markdown]
# ## The factors of one layer, before and after training
#
# A small MLP on scikit-learn digits, trained with `wk.skew` (float32 state). The
# first layer's weight is `32 x 64` (`eqx.nn.Linear` stores `out x in`): one tile,
# alone in its bucket. Its `Ql` (`32 x 32`, acting on the hidden units) and `Qr`
# (`64 x 64`, acting on the input pixels) start as the identity; the preconditioner
# is `Pl (x) Pr` with `Pl = Ql^T Ql`, `Pr = Qr^T Qr`.

# %%
digits = load_digits()
x = jnp.asarray(digits.data / 16.0, jnp.float32)
y = jnp.asarray(digits.target, jnp.int32)
model = eqx.nn.MLP(64, 10, width_size=32, depth=1, key=jax.random.key(0))
optimizer = wk.skew(learning_rate=1e-2, weight_decay=1e-4, dtype=jnp.float32)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss


def first_layer_factors(opt_state):
    """Ql, Qr of the first layer's weight: the only tile of the 32 x 64 bucket."""
    state = opt_state[0]  # the WhiteKronState at the head of the chain
    shapes = ((32, 32), (64, 64))
    [bucket] = [d for d in state.dense if (d.Ql.shape[1:], d.Qr.shape[1:]) == shapes]
    return np.asarray(bucket.Ql[0]), np.asarray(bucket.Qr[0])


before = first_layer_factors(opt_state)
rng = np.random.default_rng(0)
for i in range(400):
    idx = rng.choice(x.shape[0], 128, replace=False)
    model, opt_state, loss = step(model, opt_state, x[idx], y[idx])
after = first_layer_factors(opt_state)
print(f"loss after 400 steps: {float(loss_fn(model, x, y)):.4f}")

# %% [markdown]
# Heat maps (symmetric log colour scale): the factors leave the identity, with
# off-diagonal structure and a few large diagonal entries.

# %%
fig, axes = plt.subplots(2, 3, figsize=(11, 7))
for row, (label, (Ql, Qr)) in enumerate([("before", before), ("after", after)]):
    panels = [("Ql", Ql), ("Qr", Qr), ("Pr = Qr^T Qr", Qr.T @ Qr)]
    for ax, (title, m) in zip(axes[row], panels):
        lim = np.abs(m).max()
        norm = SymLogNorm(linthresh=0.1, vmin=-lim, vmax=lim)
        im = ax.imshow(m, cmap="RdBu_r", norm=norm)
        ax.set_title(f"{title} ({label} training)", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.75)
fig.tight_layout()

# %% [markdown]
# The large entries of `Pr` sit on input pixels whose gradients are tiny: pixels
# that are almost always blank in the digits (the left column of the 8x8 image
# is pixels 0, 8, 16, ...). Whitening scales every direction to unit size, so
# rarely-active inputs get a large preconditioner, as Adam's `1/sqrt(v)` does per
# coordinate. Side by side, as 8x8 images:

# %%
pr_diag = np.diag(after[1].T @ after[1])
pixel_std = np.asarray(x).std(axis=0)
fig, (ax_std, ax_pr) = plt.subplots(1, 2, figsize=(7, 3.2))
im = ax_std.imshow(pixel_std.reshape(8, 8), cmap="viridis")
ax_std.set_title("input pixel std", fontsize=10)
fig.colorbar(im, ax=ax_std, shrink=0.8)
im = ax_pr.imshow(np.log10(pr_diag).reshape(8, 8), cmap="magma")
ax_pr.set_title("log10 diag(Pr) after training", fontsize=10)
fig.colorbar(im, ax=ax_pr, shrink=0.8)
for ax in (ax_std, ax_pr):
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
rank = lambda v: np.argsort(np.argsort(v))
spearman = np.corrcoef(rank(pr_diag), rank(pixel_std))[0, 1]
print(f"rank correlation of diag(Pr) with pixel std: {spearman:.2f}")

# %%
# checks (tests/test_notebooks.py runs this notebook)
np.testing.assert_array_equal(before[0], np.eye(32))
np.testing.assert_array_equal(before[1], np.eye(64))
assert np.abs(after[1] - np.eye(64)).max() > 0.1
assert spearman < -0.3
# the condition numbers take an SVD of every dense factor: asked for explicitly
first = wk.preconditioner_stats(opt_state, condition_numbers=True).layers[0].weight
np.testing.assert_allclose(first["cond_right"], np.linalg.cond(after[1]), rtol=1e-3)
cond_left, cond_right = float(first["cond_left"][0]), float(first["cond_right"][0])
print(f"condition numbers of Ql, Qr: {cond_left:.1f}, {cond_right:.1f}")
