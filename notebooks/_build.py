"""Write the notebooks of this folder from the cell sources below, execute them and save
them with their outputs.

Run: `python notebooks/_build.py [name ...]` (all notebooks when no name is given; a
name is a file name without `.ipynb`, e.g. `01_quickstart`). Edit the cells here, not
in the `.ipynb` files, and rebuild.
"""

import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


HERE = Path(__file__).resolve().parent

# The tests' setting (see tests/conftest.py); the kernel inherits the environment.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


# ---------------------------------------------------------------------------------------

QUICKSTART = [
    md(
        """
        # Quick start: `wk.skew` and `wk.quad` on scikit-learn digits

        An `eqx.nn.MLP` classifies the 8x8 digit images bundled with scikit-learn. The same
        `eqx.filter_jit` training step runs with `wk.skew`, `wk.quad` and `optax.adamw`;
        the optimizers are drop-in `optax.GradientTransformation`s.
        """
    ),
    code(
        """
        import time

        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        import wkron_eqx as wk


        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int32)
        x_train, x_test, y_train, y_test = map(
            jnp.asarray, train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        )
        print(f"{x_train.shape[0]} train / {x_test.shape[0]} test images")
        """
    ),
    md(
        """
        The model holds activation functions next to its arrays, so the optimizer is
        initialised on `eqx.filter(model, eqx.is_inexact_array)`. Every hidden weight is a
        dense Kronecker-factored leaf, every bias a diagonal one. The preconditioner runs
        in float32 here (`dtype=jnp.float32`; the default is bfloat16, the reference's
        choice for large models).

        The peak learning rates are 1e-2 for `skew`/`quad` and 3e-3 for `adamw`, each
        decayed along a cosine. At the same learning rate the first steps of `skew`/`quad`
        are much smaller than AdamW's (their update is clipped to `0.22 x lr` and their
        factors start at the identity), so at AdamW's rate they lag far behind it for the
        first hundred or so steps; about 3x AdamW's rate makes up for it
        (`examples/lr_sweep.py` measures this; see `docs/choosing.md`).

        Each step is compiled before the clock starts (one warm-up call whose result is
        thrown away), so the timings below are training time only.
        """
    ),
    code(
        """
        STEPS, BATCH, EVAL_EVERY = 300, 128, 10


        def loss_fn(model, x, y):
            logits = jax.vmap(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


        @eqx.filter_jit
        def evaluate(model, x, y):
            logits = jax.vmap(model)(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


        def train(optimizer, seed=0):
            model = eqx.nn.MLP(64, 10, width_size=64, depth=2, key=jax.random.key(seed))
            opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

            @eqx.filter_jit
            def step(model, opt_state, x, y):
                loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
                params = eqx.filter(model, eqx.is_inexact_array)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return eqx.apply_updates(model, updates), opt_state, loss

            # warm-up: compile the step and the evaluation, and discard the results
            start = time.perf_counter()
            jax.block_until_ready(step(model, opt_state, x_train[:BATCH], y_train[:BATCH]))
            jax.block_until_ready(evaluate(model, x_test, y_test))
            compile_seconds = time.perf_counter() - start

            rng = np.random.default_rng(seed)
            losses, test_losses, test_accs = [], [], []
            train_seconds = 0.0
            for i in range(1, STEPS + 1):
                idx = rng.choice(x_train.shape[0], BATCH, replace=False)
                start = time.perf_counter()
                model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx])
                losses.append(float(loss))  # waits for the step
                train_seconds += time.perf_counter() - start
                if i % EVAL_EVERY == 0:
                    test_loss, test_acc = evaluate(model, x_test, y_test)
                    test_losses.append(float(test_loss))
                    test_accs.append(float(test_acc))
            return dict(
                losses=np.array(losses),
                test_losses=np.array(test_losses),
                test_accs=np.array(test_accs),
                compile_seconds=compile_seconds,
                train_seconds=train_seconds,
            )


        kronecker_lr = optax.cosine_decay_schedule(1e-2, STEPS)
        adamw_lr = optax.cosine_decay_schedule(3e-3, STEPS)
        optimizers = {
            "skew": wk.skew(kronecker_lr, weight_decay=1e-4, dtype=jnp.float32),
            "quad": wk.quad(kronecker_lr, weight_decay=1e-4, dtype=jnp.float32),
            "adamw": optax.adamw(adamw_lr, weight_decay=1e-4),
        }
        results = {name: train(optimizer) for name, optimizer in optimizers.items()}
        for name, r in results.items():
            print(
                f"{name:>5}: test accuracy {100 * r['test_accs'][-1]:.1f}%, "
                f"{1e3 * r['train_seconds'] / STEPS:.2f} ms/step "
                f"(compiled beforehand in {r['compile_seconds']:.1f} s)"
            )
        """
    ),
    md(
        """
        Left: the training loss (batch loss, smoothed over 10 steps) and the test loss.
        Right: the test accuracy during training, on its full 0-100% scale.
        """
    ),
    code(
        """
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
        smooth = np.ones(10) / 10
        eval_steps = np.arange(EVAL_EVERY, STEPS + 1, EVAL_EVERY)
        for name, r in results.items():
            smoothed = np.convolve(r["losses"], smooth, "valid")
            (line,) = ax_loss.plot(np.arange(10, STEPS + 1), smoothed, label=f"{name} (train)")
            color = line.get_color()
            ax_loss.plot(eval_steps, r["test_losses"], "--", color=color, label=f"{name} (test)")
            final = f"{name}: {100 * r['test_accs'][-1]:.1f}%"
            ax_acc.plot(eval_steps, 100 * r["test_accs"], color=color, label=final)
        ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy", title="loss")
        ax_loss.legend(ncol=2, fontsize=8)
        ax_acc.set(ylim=(0, 100), xlabel="step", ylabel="%", title="test accuracy")
        ax_acc.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        """
    ),
    code(
        """
        # the notebook doubles as a check (tests/test_notebooks.py runs it)
        assert all(r["test_accs"][-1] > 0.9 for r in results.values())
        assert all(np.isfinite(r["losses"]).all() for r in results.values())
        """
    ),
]

# ---------------------------------------------------------------------------------------

ANATOMY = [
    md(
        """
        # Anatomy: how a parameter tree is classified and tiled

        Each leaf is merged to at most two dims and given a *kind*:

        - **dense** (`wk.DENSE_PATH`): both sides at most `max_size_dense`. The matrix is cut
          into tiles of at most `block_size x block_size`; each tile has a left factor `Ql`
          and a right factor `Qr`. Tiles are *right-sized*: a tile whose valid size is
          `r x c` is stored as `r' x c'`, each side rounded up to a multiple of 8, not as a
          full block. Tiles of equal stored size from all leaves share one `DenseState`
          bucket, updated by one `vmap`.
        - **large** (`wk.LARGE_PATH`): a side longer than `max_size_dense` gets a diagonal
          factor; the other side, if short, is cut into strips with a dense factor each.
        - **one-d** (`wk.ONE_D_PATH`): vectors and scalars get one diagonal factor.

        A scanned leaf (`scanned_layers`) is a stack of independent layers, each with its
        own factors. The plan is pure Python on static shapes: `wk.tree_plan(params,
        **kwargs)` returns it without running anything (`init` stores the same plan in the
        state, as `state.plan.tree`).
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        Every tile or strip of one layer as `(row, col, stored rows, stored cols)`; from
        these, the share of the stored tile area that is padding (what
        `preconditioner_stats` calls `padding_fraction`). A dense tile stored as
        `r' x c'` costs `r'^2 + c'^2` factor entries; in the reference every tile costs
        `2 * block_size^2`.
        """
    ),
    code(
        """
        def tiles(leaf):
            \"\"\"(row, col, stored rows, stored cols) of every tile/strip of one layer.\"\"\"
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
                    for g in leaf.groups
                    for i in range(g.row_part.count)
                    for j in range(g.col_part.count)
                ]
            if leaf.kind == LeafKind.LARGE and not leaf.diag_right:
                return [
                    (0, p.start + j * p.size, rows, leaf.strip_side)
                    for p in leaf.col_parts
                    for j in range(p.count)
                ]
            if leaf.kind == LeafKind.LARGE and not leaf.diag_left:
                return [
                    (p.start + i * p.size, 0, leaf.strip_side, cols)
                    for p in leaf.row_parts
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
        print("\\ndense buckets (stored rows x cols: tiles):")
        for bucket in plan.buckets:
            owners = ", ".join(f"{names[seg.leaf]} x{seg.count}" for seg in bucket.segments)
            print(f"  {bucket.rows:>3} x {bucket.cols:<3}: {bucket.valid_count:>2}  ({owners})")
        """
    ),
    md(
        """
        Each leaf's merged matrix (one layer of a scanned stack), to scale. Every tile or
        strip is drawn at its stored size from its origin: real data in blue (alternating
        shades), padding in red. The dotted squares are the `block_size x block_size`
        tiles the reference would store for the edge tiles.
        """
    ),
    code(
        """
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
                f"{name}: {rows} x {cols}\\n{leaf.kind.name}, tiles/layer: {len(tiles(leaf))}, "
                f"{padding(leaf):.0%} padding",
                fontsize=9,
            )
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        """
    ),
    md(
        """
        `wk.preconditioner_stats` reads the same numbers (and Lipschitz estimates and
        condition numbers of every factor) from an optimizer state, also inside `jit`:
        """
    ),
    code(
        """
        stats = jax.jit(wk.preconditioner_stats)(wk.scale_by_skew(**config).init(params))
        for name in ["conv", "dense", "layers"]:
            s = stats[name]
            kind, n, pad = int(s["kind"]), int(s["tiles"]), float(s["padding_fraction"])
            cond = s["cond_left"]
            print(f"{name:>7}: kind {kind}, {n} tiles, padding {pad:.1%}, cond(Ql) {cond}")
        """
    ),
    md(
        """
        ## The factors of one layer, before and after training

        A small MLP on scikit-learn digits, trained with `wk.skew` (float32 state). The
        first layer's weight is `32 x 64` (`eqx.nn.Linear` stores `out x in`): one tile,
        alone in its bucket. Its `Ql` (`32 x 32`, acting on the hidden units) and `Qr`
        (`64 x 64`, acting on the input pixels) start as the identity; the preconditioner
        is `Pl (x) Pr` with `Pl = Ql^T Ql`, `Pr = Qr^T Qr`.
        """
    ),
    code(
        """
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
            \"\"\"Ql, Qr of the first layer's weight: the only tile of the 32 x 64 bucket.\"\"\"
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
        """
    ),
    md(
        """
        Heat maps (symmetric log colour scale): the factors leave the identity, with
        off-diagonal structure and a few large diagonal entries.
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        The large entries of `Pr` sit on input pixels whose gradients are tiny: pixels
        that are almost always blank in the digits (the left column of the 8x8 image
        is pixels 0, 8, 16, ...). Whitening scales every direction to unit size, so
        rarely-active inputs get a large preconditioner, as Adam's `1/sqrt(v)` does per
        coordinate. Side by side, as 8x8 images:
        """
    ),
    code(
        """
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
        """
    ),
    code(
        """
        # checks (tests/test_notebooks.py runs this notebook)
        np.testing.assert_array_equal(before[0], np.eye(32))
        np.testing.assert_array_equal(before[1], np.eye(64))
        assert np.abs(after[1] - np.eye(64)).max() > 0.1
        assert spearman < -0.3
        first = jax.jit(wk.preconditioner_stats)(opt_state).layers[0].weight
        np.testing.assert_allclose(first["cond_right"], np.linalg.cond(after[1]), rtol=1e-3)
        cond_left, cond_right = float(first["cond_left"][0]), float(first["cond_right"][0])
        print(f"condition numbers of Ql, Qr: {cond_left:.1f}, {cond_right:.1f}")
        """
    ),
]

# ---------------------------------------------------------------------------------------

ILL_CONDITIONED = [
    md(
        """
        # An ill-conditioned least-squares problem

        `loss(W) = 1/2 ||A W B - C||^2` with `W` of shape `32 x 24`. Its Hessian is
        `(B B^T) (x) (A^T A)`: exactly Kronecker-structured, with condition number
        `cond(A)^2 cond(B)^2`. With the singular values of `A` and `B` spread
        geometrically over a factor of 10 each, that is `1e4`. A Kronecker-factored
        preconditioner can learn the inverse of each factor; a diagonal one (Adam) cannot
        undo the rotations.

        All three whiten the gradient, so their steps have a fixed scale: each runs with
        a cosine decay of its learning rate to zero over the run, and gets a small grid
        of peak learning rates. The best run (lowest final loss) is drawn bold, the others
        faint. The peak learning rate is a traced argument of the jitted run (the
        optimizer is built inside it), so each optimizer compiles once for its grid.
        """
    ),
    code(
        """
        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        import wkron_eqx as wk


        m, n, steps = 32, 24, 600
        rng = np.random.default_rng(0)


        def with_spectrum(rows, cols, singular_values):
            u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
            v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
            s = np.zeros((rows, cols))
            np.fill_diagonal(s, singular_values)
            return u @ s @ v.T


        A = jnp.asarray(with_spectrum(m, m, np.geomspace(1, 0.1, m)), jnp.float32)
        B = jnp.asarray(with_spectrum(n, n, np.geomspace(1, 0.1, n)), jnp.float32)
        W_star = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        C = A @ W_star @ B
        hessian = np.kron(np.asarray(B @ B.T, np.float64), np.asarray(A.T @ A, np.float64))
        print(f"condition number of the Hessian: {np.linalg.cond(hessian):.3g}")


        def loss_fn(W):
            return 0.5 * jnp.sum((A @ W @ B - C) ** 2)
        """
    ),
    code(
        """
        optimizers = {
            "adamw": lambda lr: optax.adamw(lr, weight_decay=0.0),
            "quad": lambda lr: wk.quad(lr, weight_decay=0.0, dtype=jnp.float32),
            "skew": lambda lr: wk.skew(lr, weight_decay=0.0, dtype=jnp.float32),
        }
        grid = [1e-2, 3e-2, 1e-1, 3e-1, 1.0]
        W0 = jnp.zeros((m, n))


        def make_run(optimizer):
            @jax.jit
            def run(peak_lr):
                tx = optimizer(optax.cosine_decay_schedule(peak_lr, steps))

                def body(carry, _):
                    W, state = carry
                    loss, grad = jax.value_and_grad(loss_fn)(W)
                    updates, state = tx.update(grad, state, W)
                    return (optax.apply_updates(W, updates), state), loss

                _, losses = jax.lax.scan(body, (W0, tx.init(W0)), length=steps)
                return losses

            return run


        curves = {}
        for name, optimizer in optimizers.items():
            run = make_run(optimizer)
            curves[name] = {lr: np.asarray(run(jnp.float32(lr))) for lr in grid}
            best = min(grid, key=lambda lr: np.nan_to_num(curves[name][lr][-1], nan=np.inf))
            print(f"{name:>5}: best lr {best:g}, final loss {curves[name][best][-1]:.3e}")
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(8, 4.5))
        best_final = {}
        for color, (name, by_lr) in zip(["C2", "C1", "C0"], curves.items()):
            finals = {lr: np.nan_to_num(c[-1], nan=np.inf) for lr, c in by_lr.items()}
            best = min(finals, key=finals.get)
            best_final[name] = finals[best]
            for lr, c in by_lr.items():
                if lr != best:
                    ax.plot(c, color=color, alpha=0.2, lw=0.8)
            ax.plot(by_lr[best], color=color, lw=2, label=f"{name} (lr={best:g})")
        title = "0.5 ||A W B - C||^2, Hessian condition number 1e4"
        ax.set(yscale="log", xlabel="step", ylabel="loss", title=title)
        ax.legend()
        fig.tight_layout()
        """
    ),
    code(
        """
        # checks (tests/test_notebooks.py runs this notebook): both Kronecker methods beat
        # the diagonal one by orders of magnitude on this problem
        assert best_final["quad"] < 1e-2 * best_final["adamw"]
        assert best_final["skew"] < 1e-2 * best_final["adamw"]
        """
    ),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_anatomy": ANATOMY,
    "03_ill_conditioned": ILL_CONDITIONED,
}


def build(name: str, execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook(cells=NOTEBOOKS[name])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    if execute:
        start = time.perf_counter()
        NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(HERE)}},
        ).execute()
        print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    if _FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
    for name in sys.argv[1:] or NOTEBOOKS:
        build(name)
