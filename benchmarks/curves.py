"""Is it worth it? Loss against steps and against wall-clock time for `wk.quad` (and
`wk.skew`), `optax.adamw` and `optax.contrib.muon`, each at the best learning rate of a
small grid.

    python -m benchmarks curves [--quick] [--problems digits,charlm] [--optimizers ...]
    python -m benchmarks curves --time-only     # the step times again, same curves
    python -m benchmarks curves --report-only   # curves.md and curves.png from the json

Two problems, each trained as a user would, with an Equinox model, minibatches and a
decaying learning rate (weight decay 1e-4 for every optimizer):

- **digits**: `examples/demo.py`'s task, an `eqx.nn.MLP` 64-128-128-10 on scikit-learn's
  bundled digits (1347 train / 450 test images), 600 steps of minibatch 128, cosine
  decay to 0. The curve is the loss on the whole training set; the best learning rate is
  the one with the lowest final training loss.
- **charlm**: a character-level transformer (3 pre-norm blocks, d=128, 4 heads, context
  64, the blocks stacked on a leading axis, run with `jax.lax.scan` and flagged with
  `scanned_layers`) on the source text of 16 Python standard-library modules (`MODULES`,
  read through `inspect.getsourcefile`: deterministic for a given Python version, no
  download), as UTF-8 bytes (vocabulary 256). The last 10% of the text is held out;
  the curve is the loss on 128 fixed windows of it, and the best learning rate the one
  with the lowest final validation loss. 600 steps of 16 windows, a linear warm-up of 30
  steps and a cosine decay to 0.

Every optimizer runs the grid `1e-3, 3e-3, 1e-2` (digits: and `3e-2`), and one more
point of `LADDER` past an edge where the best lies. The peak learning rate is an
argument of the compiled training chunk (a `jax.lax.scan` of steps), so each optimizer
compiles once per problem and runs its whole grid with that program. Time per training
step (forward, backward and optimizer update) is measured after the grid, in rounds that
visit the optimizers in turn so that load on a shared machine falls on each alike; the
fastest round is kept. The wall-clock axis of the plot is steps times that time per step
(compilation and evaluation excluded; compile times are in the json). Writes
`benchmarks/results/curves.json`, `curves.md` and `curves.png`; `--problems` runs a
subset and merges it into the json. `--quick` (tiny sizes, one learning rate) writes to
the temporary directory instead.
"""

import dataclasses
import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import wkron_eqx as wk

from ._harness import read_results, write_results


DESCRIPTION = "is it worth it: loss against steps and time on two problems, best lr each"
WEIGHT_DECAY = 1e-4
MODULES = (
    "argparse",
    "inspect",
    "typing",
    "enum",
    "dataclasses",
    "functools",
    "collections",
    "difflib",
    "ast",
    "statistics",
    "subprocess",
    "logging",
    "shutil",
    "textwrap",
    "contextlib",
    "random",
)


# ---------------------------------------------------------------------------- optimizers


def _muon_dims(is_muon: Callable[[tuple], bool]):
    """Muon's dimension numbers for Equinox weights, stored `[..., out, in]`."""

    def dims(params):
        def leaf(path, x):
            if x.ndim < 2 or not is_muon(path):
                return None
            return optax.contrib.MuonDimensionNumbers(
                reduction_axis=x.ndim - 1, output_axis=x.ndim - 2
            )

        return jax.tree_util.tree_map_with_path(leaf, params)

    return dims


def optimizers(problem: "Problem") -> dict[str, Callable]:
    """Name -> function from a learning-rate schedule to the transformation."""
    kron = dict(weight_decay=WEIGHT_DECAY, dtype=jnp.float32, scanned_layers=problem.scanned)
    return {
        "optax.adamw": lambda lr: optax.adamw(lr, weight_decay=WEIGHT_DECAY),
        # consistent_rms=0.2 scales Muon's orthogonalised update to AdamW's RMS (optax's
        # recommendation), so that one learning rate serves it and its Adam part.
        "optax.contrib.muon": lambda lr: optax.contrib.muon(
            lr,
            weight_decay=WEIGHT_DECAY,
            adam_weight_decay=WEIGHT_DECAY,
            consistent_rms=0.2,
            muon_weight_dimension_numbers=_muon_dims(problem.muon_leaf),
        ),
        "wk.quad, init None": lambda lr: wk.quad(lr, preconditioner_init_scale=None, **kron),
        "wk.skew, init None": lambda lr: wk.skew(lr, preconditioner_init_scale=None, **kron),
        "wk.quad, identity start": lambda lr: wk.quad(lr, **kron),
    }


# ------------------------------------------------------------------------------ problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, its data and how it is trained and evaluated."""

    name: str
    params: eqx.Module  # the model's inexact arrays
    static: eqx.Module  # the rest of the model
    scanned: object  # `scanned_layers` for the Kronecker optimizers
    muon_leaf: Callable  # key path -> whether Muon (not its Adam part) takes the weight
    data: tuple
    batches: np.ndarray  # [steps, ...]: what `loss` reads for each step
    loss: Callable  # (model, data, one step's batches row) -> minibatch loss
    evaluate: Callable  # (model, data) -> the curve's loss
    schedule: Callable  # step -> learning rate over the peak learning rate
    every: int  # steps between two points of the curve
    grid: tuple
    metric: str


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def digits_problem(steps: int, grid: tuple) -> Problem:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    model = eqx.nn.MLP(64, 10, width_size=128, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    rng = np.random.default_rng(0)
    batches = np.stack([rng.choice(len(x_train), 128, replace=False) for _ in range(steps)])

    def loss(model, data, idx):
        x_train, y_train, _, _ = data
        return _xent(jax.vmap(model)(x_train[idx]), y_train[idx])

    def evaluate(model, data):
        x_train, y_train, _, _ = data
        return _xent(jax.vmap(model)(x_train), y_train)

    return Problem(
        name="digits",
        params=params,
        static=static,
        scanned=None,
        muon_leaf=lambda path: True,  # every weight matrix, optax's default rule
        data=tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test)),
        batches=batches.astype(np.int32),
        loss=loss,
        evaluate=evaluate,
        schedule=optax.cosine_decay_schedule(1.0, steps),
        every=5,
        grid=grid,
        metric="full training loss",
    )


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    norm2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, width: int, heads: int, key):
        k_qkv, k_proj, k_fc1, k_fc2 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k_qkv)
        self.proj = eqx.nn.Linear(width, width, key=k_proj)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.fc1 = eqx.nn.Linear(width, 4 * width, key=k_fc1)
        self.fc2 = eqx.nn.Linear(4 * width, width, key=k_fc2)
        self.heads = heads

    def __call__(self, x):  # [context, width]
        context, width = x.shape
        qkv = jax.vmap(self.qkv)(jax.vmap(self.norm1)(x))
        q, k, v = (a.reshape(context, self.heads, -1) for a in jnp.split(qkv, 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(context, width)
        x = x + jax.vmap(self.proj)(y)
        hidden = jax.nn.gelu(jax.vmap(self.fc1)(jax.vmap(self.norm2)(x)))
        return x + jax.vmap(self.fc2)(hidden)


class CharLM(eqx.Module):
    embed: eqx.nn.Embedding
    position: jax.Array
    blocks: Block  # every field stacked on a leading axis of `depth`
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int, width: int, depth: int, heads: int, context: int, key):
        k_embed, k_position, k_blocks, k_head = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, width, key=k_embed)
        self.position = 0.02 * jax.random.normal(k_position, (context, width))
        make = lambda k: Block(width, heads, k)
        self.blocks = eqx.filter_vmap(make)(jax.random.split(k_blocks, depth))
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, vocab, key=k_head)

    def __call__(self, tokens):  # [context] -> [context, vocab]
        x = jax.vmap(self.embed)(tokens) + self.position[: tokens.shape[0]]
        layers, static = eqx.partition(self.blocks, eqx.is_array)

        def block(x, layer):
            return eqx.combine(layer, static)(x), None

        x, _ = jax.lax.scan(block, x, layers)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def stdlib_text(modules=MODULES) -> bytes:
    sources = []
    for name in modules:
        path = inspect.getsourcefile(importlib.import_module(name))
        sources.append(Path(path).read_text(encoding="utf-8"))
    return "\n".join(sources).encode("utf-8")


def charlm_problem(
    steps: int,
    grid: tuple,
    modules=MODULES,
    width: int = 128,
    depth: int = 3,
    context: int = 64,
    batch: int = 16,
    windows: int = 128,
    every: int = 50,
) -> Problem:
    text = np.frombuffer(stdlib_text(modules), np.uint8).astype(np.int32)
    split = int(0.9 * len(text))
    train, valid = text[:split], text[split:]
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train) - context - 1, size=(steps, batch))
    val_starts = np.linspace(0, len(valid) - context - 1, windows).astype(np.int32)
    model = CharLM(256, width, depth, 4, context, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    scanned = eqx.tree_at(lambda m: m.blocks, jax.tree.map(lambda _: False, params), True)
    offsets = jnp.arange(context + 1)

    def windows_loss(model, tokens, starts):
        seq = tokens[starts[:, None] + offsets]
        return _xent(jax.vmap(model)(seq[:, :-1]), seq[:, 1:])

    def loss(model, data, idx):
        return windows_loss(model, data[0], idx)

    def evaluate(model, data):
        return windows_loss(model, data[1], data[2])

    def is_muon(path):  # the blocks' matrices; the embedding and the head stay with Adam
        return getattr(path[0], "name", None) == "blocks"

    return Problem(
        name="charlm",
        params=params,
        static=static,
        scanned=scanned,
        muon_leaf=is_muon,
        data=(jnp.asarray(train), jnp.asarray(valid), jnp.asarray(val_starts)),
        batches=starts.astype(np.int32),
        loss=loss,
        evaluate=evaluate,
        schedule=optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps),
        every=every,
        grid=grid,
        metric="validation loss",
    )


# ------------------------------------------------------------------------------ training


def compiled_chunk(problem: Problem, make_tx: Callable):
    """`every` training steps as one compiled program, the peak learning rate an input."""

    def chunk(params, opt_state, peak, data, batches):
        tx = make_tx(lambda count: peak * problem.schedule(count))

        def step(carry, idx):
            params, opt_state = carry
            loss_fn = lambda p: problem.loss(eqx.combine(p, problem.static), data, idx)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (eqx.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses

    opt_state = make_tx(problem.schedule).init(problem.params)
    peak = jnp.asarray(1.0, jnp.float32)
    start = time.perf_counter()
    compiled = (
        jax.jit(chunk)
        .lower(problem.params, opt_state, peak, problem.data, problem.batches[: problem.every])
        .compile()
    )
    return compiled, opt_state, time.perf_counter() - start


def train(problem: Problem, compiled, opt_state, lr: float) -> dict:
    evaluate = jax.jit(lambda p, data: problem.evaluate(eqx.combine(p, problem.static), data))
    params, peak = problem.params, jnp.asarray(lr, jnp.float32)
    steps = [0]
    curve = [float(evaluate(params, problem.data))]
    for k in range(0, len(problem.batches), problem.every):
        batches = problem.batches[k : k + problem.every]
        params, opt_state, _ = compiled(params, opt_state, peak, problem.data, batches)
        steps.append(k + problem.every)
        curve.append(float(evaluate(params, problem.data)))
    out = {"steps": steps, "loss": curve}
    if problem.name == "digits":
        _, _, x_test, y_test = problem.data
        model = eqx.combine(params, problem.static)
        out["test_accuracy"] = float(jnp.mean(jnp.argmax(jax.vmap(model)(x_test), -1) == y_test))
    return out


def time_steps(problem: Problem, programs: dict, best: dict, rounds: int, chunks: int) -> dict:
    """Milliseconds per training step at each optimizer's best lr, rounds interleaved.

    Wall-clock time (the fastest round: other load only ever adds to it) and the process's
    CPU time over all its threads (the median round: on a machine shared with other jobs
    it moves far less than the wall-clock time, and it checks the wall-clock ratios).
    """
    wall, cpu = {name: [] for name in programs}, {name: [] for name in programs}
    for _ in range(rounds):
        for name, (compiled, opt_state) in programs.items():
            params, peak = problem.params, jnp.asarray(best[name], jnp.float32)
            start, start_cpu = time.perf_counter(), time.process_time()
            for c in range(chunks):
                batches = problem.batches[c * problem.every : (c + 1) * problem.every]
                params, opt_state, losses = compiled(params, opt_state, peak, problem.data, batches)
            jax.block_until_ready((params, opt_state, losses))
            wall[name].append(1e3 * (time.perf_counter() - start) / (chunks * problem.every))
            cpu[name].append(1e3 * (time.process_time() - start_cpu) / (chunks * problem.every))
    return {
        "ms_per_step_rounds": wall,
        "cpu_ms_per_step_rounds": cpu,
        "ms_per_step": {name: min(t) for name, t in wall.items()},
        "cpu_ms_per_step": {name: float(np.median(t)) for name, t in cpu.items()},
    }


LADDER = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def best_lr(runs: dict) -> str:
    finals = {lr: r["loss"][-1] for lr, r in runs.items()}
    return min(finals, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)


def run_grid(problem: Problem, name: str, compiled, opt_state) -> dict:
    """The grid, and one more point of `LADDER` past an edge where the best lr lies."""
    runs, todo = {}, list(problem.grid)
    while todo:
        lr = todo.pop(0)
        start = time.perf_counter()
        runs[f"{lr:g}"] = train(problem, compiled, opt_state, lr)
        print(
            f"{problem.name} {name} lr {lr:g}: final {runs[f'{lr:g}']['loss'][-1]:.4f}"
            f" ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        if not todo and len(problem.grid) > 1 and len(runs) == len(problem.grid):
            tried = sorted(float(k) for k in runs)
            best, i = float(best_lr(runs)), LADDER.index(float(best_lr(runs)))
            if best == tried[-1] and i + 1 < len(LADDER):
                todo.append(LADDER[i + 1])
            elif best == tried[0] and i > 0:
                todo.append(LADDER[i - 1])
    return runs


def run_problem(problem: Problem, names: list[str], rounds: int, chunks: int) -> dict:
    programs, runs, compile_s = {}, {}, {}
    for name, make_tx in optimizers(problem).items():
        if name not in names:
            continue
        compiled, opt_state, compile_s[name] = compiled_chunk(problem, make_tx)
        programs[name] = (compiled, opt_state)
        runs[name] = run_grid(problem, name, compiled, opt_state)
    best = {name: best_lr(r) for name, r in runs.items()}
    times = time_steps(problem, programs, {n: float(b) for n, b in best.items()}, rounds, chunks)
    return {
        "metric": problem.metric,
        "steps": int(len(problem.batches)),
        "grid": [f"{lr:g}" for lr in sorted({float(k) for r in runs.values() for k in r})],
        "runs": runs,
        "best_lr": best,
        "compile_s": compile_s,
        **times,
    }


def retime(problem: Problem, result: dict, rounds: int, chunks: int) -> dict:
    """`result` with its step times measured again (the curves are deterministic)."""
    programs = {}
    for name, make_tx in optimizers(problem).items():
        if name in result["best_lr"]:
            compiled, opt_state, _ = compiled_chunk(problem, make_tx)
            programs[name] = (compiled, opt_state)
    best = {name: float(lr) for name, lr in result["best_lr"].items()}
    return {**result, **time_steps(problem, programs, best, rounds, chunks)}


# ------------------------------------------------------------------------------- reports

AT = {"digits": (10, 25, 50, 100), "charlm": (50, 100, 200, 300)}
MAIN = ("optax.adamw", "optax.contrib.muon", "wk.quad, init None")
SHORT = {
    "adamw": "optax.adamw",
    "muon": "optax.contrib.muon",
    "quad": "wk.quad, init None",
    "skew": "wk.skew, init None",
    "quad-identity": "wk.quad, identity start",
}
LABELS = {
    "wk.quad, init None": "wk.quad(preconditioner_init_scale=None)",
    "wk.skew, init None": "wk.skew(preconditioner_init_scale=None)",
    "wk.quad, identity start": "wk.quad (identity start)",
}
COLOURS = {
    "optax.adamw": "tab:blue",
    "optax.contrib.muon": "tab:green",
    "wk.quad, init None": "tab:red",
    "wk.skew, init None": "tab:purple",
    "wk.quad, identity start": "tab:orange",
}


def loss_at(run: dict, step: int) -> float:
    return run["loss"][run["steps"].index(step)] if step in run["steps"] else float("nan")


def table(results: dict) -> str:
    lines = []
    for problem, res in results.items():
        at = [s for s in AT.get(problem, ()) if s < res["steps"]]
        adamw = res["runs"]["optax.adamw"][res["best_lr"]["optax.adamw"]]
        adamw_ms = res["ms_per_step"]["optax.adamw"]
        lines.append(
            f"**{problem}** ({res['metric']}, {res['steps']} steps; lr grid "
            f"{', '.join(res['grid'])}):\n"
        )
        head = "| optimizer | best lr | " + "".join(f"loss @{s} | " for s in at)
        head += "final loss | vs adamw: " + "".join(f"@{s}, " for s in at)
        head += "final | ms/step | vs adamw | CPU time vs adamw |"
        if problem == "digits":
            head += " test acc |"
        lines.append(head)
        lines.append("|---" * (head.count("|") - 1) + "|")
        for name, lr in res["best_lr"].items():
            run = res["runs"][name][lr]
            losses = [loss_at(run, s) for s in at] + [run["loss"][-1]]
            ref = [loss_at(adamw, s) for s in at] + [adamw["loss"][-1]]
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(losses, ref))
            ms = res["ms_per_step"][name]
            row = f"| {name} | {lr} | " + " | ".join(f"{v:.4g}" for v in losses)
            cpu = res["cpu_ms_per_step"][name] / res["cpu_ms_per_step"]["optax.adamw"]
            row += f" | {ratios} | {ms:.2f} | {ms / adamw_ms:.2f} | {cpu:.2f} |"
            if problem == "digits":
                row += f" {100 * run['test_accuracy']:.2f}% |"
            lines.append(row)
        lines.append("")
        lines.append(f"Final {res['metric']} at every learning rate of the grid:\n")
        lines.append("| optimizer | " + " | ".join(f"lr {lr}" for lr in res["grid"]) + " |")
        lines.append("|---" * (len(res["grid"]) + 1) + "|")
        for name, runs in res["runs"].items():
            cells = [f"{runs[lr]['loss'][-1]:.4g}" if lr in runs else "" for lr in res["grid"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    titles = {"digits": "digits MLP", "charlm": "char-level transformer LM"}
    for row, (problem, res) in zip(axes, results.items()):
        for name in MAIN:
            if name not in res["best_lr"]:
                continue
            lr = res["best_lr"][name]
            run = res["runs"][name][lr]
            steps = np.asarray(run["steps"])
            seconds = steps * res["ms_per_step"][name] / 1e3
            label = f"{LABELS.get(name, name)}, lr {lr}"
            row[0].plot(steps, run["loss"], color=COLOURS[name], label=label)
            row[1].plot(seconds, run["loss"], color=COLOURS[name], label=label)
        title = f"{titles.get(problem, problem)}, {res['steps']} steps"
        # The first point (the untrained model) would squeeze the LM's curves flat.
        top = max(res["runs"][n][res["best_lr"][n]]["loss"][1] for n in MAIN if n in res["best_lr"])
        for ax, xlabel in zip(row, ("step", "training time, s (2-core CPU, compile excluded)")):
            if problem == "digits":
                ax.set_yscale("log")
            else:
                ax.set_ylim(top=1.05 * top)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(res["metric"])
            ax.set_title(title)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_arguments(parser):
    parser.add_argument("--problems", default="digits,charlm")
    parser.add_argument(
        "--optimizers",
        default=None,
        help=f"some of {', '.join(SHORT)}; default: all on digits, the first three on charlm",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite curves.md and .png from the json"
    )
    parser.add_argument(
        "--time-only", action="store_true", help="measure the step times again, keep the curves"
    )


def run(args):
    results = {}
    for name in [] if args.report_only else args.problems.split(","):
        if args.quick:
            grid, rounds, chunks, names = (1e-2,), 1, 1, list(MAIN)
            if name == "digits":
                problem = digits_problem(20, grid)
            else:
                small = dict(width=32, depth=2, context=16, batch=4, windows=8, every=5)
                problem = charlm_problem(10, grid, modules=("textwrap",), **small)
        else:
            rounds = 3
            default = "adamw,muon,quad" if name == "charlm" else ",".join(SHORT)
            names = [SHORT[key] for key in (args.optimizers or default).split(",")]
            if name == "digits":
                problem, chunks = digits_problem(600, (1e-3, 3e-3, 1e-2, 3e-2)), 20
            else:
                problem, chunks = charlm_problem(600, (1e-3, 3e-3, 1e-2)), 1
        if args.time_only:
            previous = read_results(args)[name]
            results[name] = retime(problem, previous, 5, chunks)
        else:
            results[name] = run_problem(problem, names, rounds, chunks)
    notes = (
        f"2-core CPU shared with other jobs, optax {optax.__version__}, "
        f"Python {sys.version.split()[0]}, seed 0. digits: `eqx.nn.MLP` 64-128-128-10 on "
        "scikit-learn's digits, minibatch 128, cosine decay, loss on the whole training set. "
        "charlm: a character-level transformer (3 blocks, d=128, 4 heads, context 64, "
        "scanned blocks) on the source of 16 standard-library modules (`MODULES`), 16 "
        "windows a step, warm-up and cosine decay, loss on 128 windows of the held-out last "
        "10%. Every optimizer: weight decay "
        f"{WEIGHT_DECAY:g}; `wk.*`: float32 factors, `scanned_layers` on the blocks; "
        "`optax.contrib.muon`: `consistent_rms=0.2`, Muon on the weight matrices (on the "
        "LM, those of the blocks; the embedding and the head with its Adam). Each at the "
        'best peak learning rate of its grid (lowest final loss). "vs adamw": over '
        "`optax.adamw` at its best rate, at the same step. ms/step: a whole training step "
        "(forward, backward, update), the fastest of interleaved rounds, compile excluded; "
        "CPU time: the median round's process CPU time, as a check on the wall-clock "
        "ratio."
    )
    merged = {}

    def merge(earlier):
        merged.update(earlier or {})
        merged.update(results)
        return merged

    folder = write_results(
        args, None, table, title="Loss against steps and time", notes=notes, merge=merge
    )
    print(table(merged))
    plot(merged, folder / "curves.png")
