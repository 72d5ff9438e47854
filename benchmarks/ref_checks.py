"""Reliability repros, run on wkron_eqx and on the reference (eformer 0.0.101's white_kron).

    python -m benchmarks ref_checks [--reference-python .refenv/bin/python]

The same small script runs in a subprocess for each implementation (the reference in its
own virtual environment, `benchmarks/setup_reference.sh`): does `update` mutate the input
state; does one NaN gradient poison the state for the next three good steps; are
`block_size=0`, `lr_style="sgd"`, `b1=1.5`, `max_size_dense=-1` accepted; what error does a
mismatched gradient tree give; does a zero gradient with `noise_scale=0` give NaN; are
`preconditioner_lr=0.1` and `0.4` the same step. Prints a markdown table and writes
`benchmarks/results/ref_checks.{json,md}`. Without a reference environment (given, or
`.refenv`) only wkron_eqx runs. `--quick` runs the same (it is small already), but writes
under the temporary directory.
"""

import json
import sys
import tempfile
from pathlib import Path

from ._harness import reference_python, run_python, write_results


DESCRIPTION = "the reference's failure modes (mutated state, NaN poisoning, ...) beside ours"

RUNNER = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp

impl, out_path = sys.argv[1], sys.argv[2]
if impl == "reference":
    from eformer.optimizers._tx import white_kron as wk
else:
    import wkron_eqx as wk

SMALL = dict(block_size=8)


def tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale * rng.standard_normal((6, 5)), jnp.float32),
        "b": jnp.asarray(scale * rng.standard_normal(5), jnp.float32),
    }


def floats(t):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(t)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def finite(t):
    return all(np.all(np.isfinite(x)) for x in floats(t))


def field(state, name):
    if isinstance(state, dict):
        return state.get(name)
    return getattr(state, name, None)


def short(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


results = {}


def case(name):
    def run(fn):
        try:
            results[name] = fn()
        except Exception as e:  # what each implementation does is the result
            results[name] = "raised " + short(e)
    return run


@case("update mutates the input state (eager)")
def _():
    tx = wk.scale_by_quad(**SMALL)
    state = tx.init(tree(0))
    before = [np.array(x, copy=True) for x in jax.tree.leaves(state)]
    _, new_state = tx.update(tree(1), state)
    after = jax.tree.leaves(state)
    changed = len(before) != len(after) or any(
        a.shape != np.shape(b) or not np.array_equal(a, np.asarray(b))
        for a, b in zip(before, after))
    return f"{'yes' if changed else 'no'} (returns the input object: {new_state is state})"


@case("NaN gradient, then 3 good steps: state poisoned?")
def _():
    tx = wk.scale_by_quad(dtype=jnp.float32, **SMALL)
    update = jax.jit(tx.update)
    _, state = update(tree(1), tx.init(tree(0)))
    bad = tree(2)
    bad["b"] = bad["b"].at[1].set(jnp.nan)
    bad_update, state = update(bad, state)
    for seed in (3, 4, 5):
        updates, state = update(tree(seed), state)
    if not (finite(updates) and finite(state)):
        return "poisoned: NaN in the state and every later update"
    zero = all(np.all(x == 0) for x in floats(bad_update))
    skipped = field(state, "skipped_steps")
    return (f"clean: bad step's update all zero: {zero}, "
            f"skipped_steps={None if skipped is None else int(skipped)}")


for kwargs in ({"block_size": 0}, {"lr_style": "sgd"}, {"b1": 1.5}, {"max_size_dense": -1}):
    name = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + " accepted?"

    @case(name)
    def _(kwargs=kwargs):
        stage = "construction"
        try:
            tx = wk.scale_by_quad(**kwargs)
            stage = "init"
            state = tx.init(tree(0))
            stage = "update"
            updates, _ = jax.jit(tx.update)(tree(1), state)
        except Exception as e:
            return f"refused at {stage}: {short(e)}"
        return f"accepted (first update finite: {finite(updates)})"


@case("mismatched tree: a leaf of another shape")
def _():
    tx = wk.scale_by_quad(**SMALL)
    state = tx.init(tree(0))
    grads = {"w": jnp.ones((5, 6)), "b": jnp.ones(5)}
    jax.jit(tx.update)(grads, state)
    return "no error"


@case("mismatched tree: an extra leaf")
def _():
    tx = wk.scale_by_quad(**SMALL)
    state = tx.init(tree(0))
    grads = dict(tree(1), c=jnp.ones(3))
    jax.jit(tx.update)(grads, state)
    return "no error"


@case("zero gradient, noise_scale=0: NaN?")
def _():
    tx = wk.scale_by_quad(noise_scale=0.0, **SMALL)
    update = jax.jit(tx.update)
    zero_updates, state = update(tree(1, scale=0.0), tx.init(tree(0)))
    nan_zero = not (finite(zero_updates) and finite(state))
    updates, state = update(tree(2), state)
    nan_next = not (finite(updates) and finite(state))
    real = any(np.any(x != 0) for x in floats(updates))
    return (f"NaN after the zero step: {nan_zero}; after the next real step: {nan_next} "
            f"(non-zero update: {real})")


@case("preconditioner_lr=0.1 vs 0.4: identical step?")
def _():
    outs = []
    for lr in (0.1, 0.4):
        tx = wk.scale_by_quad(preconditioner_lr=lr, noise_scale=0.0, dtype=jnp.float32, **SMALL)
        outs.append(jax.jit(tx.update)(tree(1), tx.init(tree(0))))
    a, b = floats(outs[0]), floats(outs[1])
    if all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b)):
        return "identical (0.1 is clamped to 0.4)"
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b) if x.size)
    return f"differ (max |difference| of update and state {diff:.3g})"


with open(out_path, "w") as f:
    json.dump({"results": results, "jax": jax.__version__}, f)
"""


def checks(python: str, impl: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out.json")
        run_python(python, RUNNER, impl, str(out), env={"JAX_PLATFORMS": "cpu"})
        return json.loads(out.read_text())


def add_arguments(parser):
    parser.add_argument("--reference-python", default=None, help="default: .refenv/bin/python")


def run(args):
    ref_python = reference_python(args.reference_python)
    ours = checks(sys.executable, "wkron_eqx")
    reference = checks(ref_python, "reference") if ref_python else None
    rows = [
        {
            "case": name,
            "reference": None if reference is None else reference["results"].get(name),
            "wkron_eqx": result,
        }
        for name, result in ours["results"].items()
    ]
    lines = ["| case | reference | wkron_eqx |", "|---|---|---|"]
    for row in rows:
        cells = [row["case"], row["reference"] or "(not run)", row["wkron_eqx"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    text = "\n".join(lines)
    print(text)
    record = {
        "reference_python": ref_python,
        "jax": {"wkron_eqx": ours["jax"], "reference": reference and reference["jax"]},
        "cases": rows,
    }
    write_results(args, record, text, title="The reference's failure modes, and ours")
