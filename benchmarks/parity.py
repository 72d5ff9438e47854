"""Parity with the reference: eformer 0.0.101's `scale_by_quad` / `scale_by_skew`.

    python -m benchmarks parity [--reference-python .refenv/bin/python] [--steps 20]
                                [--cases mlp,conv,...]

Both implementations see the same params and gradients (float32, `noise_scale=0`) for
`--steps` steps, each in its own interpreter (the reference in its own virtual
environment, `benchmarks/setup_reference.sh`). Prints, per case and rule, the worst
per-leaf cosine similarity and norm ratio over all steps, and writes them to
`benchmarks/results/parity.json` (and `.md`). `--cases` picks some of `CASES` (default
all). `--quick`: the `scanned` case for 3 steps. `tests/test_parity.py` runs this
benchmark (`python -m benchmarks parity`) in a subprocess.

This module does not import `wkron_eqx`: the reference's interpreter imports its `CASES`,
`arrays` and `flat`.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from ._harness import reference_python, run_python, write_results


DESCRIPTION = "the updates of both implementations on the same gradients, worst leaf per case"

# name -> (params shapes, scanned flags or None, extra keyword arguments)
CASES = {
    "mlp": (
        {"w0": (300, 200), "b0": (200,), "w1": (200, 130), "b1": (130,), "w2": (130, 10)},
        None,
        {"block_size": 128},
    ),
    "conv": (
        {"k0": (3, 3, 3, 16), "k1": (3, 3, 16, 32), "k2": (5, 5, 32, 8), "bias": (32,)},
        None,
        {"block_size": 128},
    ),
    "scanned": (
        {"layers": {"w": (4, 64, 96), "norm": (4, 96)}, "head": (96, 10)},
        {"layers": {"w": True, "norm": True}, "head": False},
        {"block_size": 64},
    ),
    "large": (
        {"embed": (20000, 48), "w": (64, 32)},
        None,
        {},
    ),
    "both_diagonal": (
        {"tall": (100, 40), "wide": (30, 90), "both": (100, 80), "small": (20, 30)},
        None,
        {"max_size_dense": 64, "block_size": 16},
    ),
}
RULES = ("quad", "skew")


def arrays(shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in shapes.items():
        if isinstance(s, dict):
            out[name] = arrays(s, seed + 1000 + len(name))
        else:
            out[name] = rng.standard_normal(s).astype(np.float32)
    return out


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


RUNNER = r"""
import numpy as np, jax, jax.numpy as jnp
from benchmarks.parity import CASES, arrays, flat
{imports}
out = {{}}
for case in {cases!r}:
    shapes, scanned, extra = CASES[case]
    for rule in {rules!r}:
        tx = {factory}(rule)(
            b1=0.95, dtype=jnp.float32, noise_scale=0.0, scanned_layers=scanned, **extra
        )
        params = jax.tree.map(jnp.asarray, arrays(shapes, 0))
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range({steps}):
            grads = jax.tree.map(jnp.asarray, arrays(shapes, 100 + step))
            u, state = update(grads, state, params)
            for k, v in flat(jax.tree.map(np.asarray, u)).items():
                out[f"{{case}}|{{rule}}|{{step}}|{{k}}"] = v.astype(np.float32)
np.savez({path!r}, **out)
"""


def updates(python: str, factory: str, imports: str, steps: int, cases=tuple(CASES)) -> dict:
    """Every leaf's update at every step, computed in `python`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "out.npz")
        script = RUNNER.format(
            imports=imports,
            factory=factory,
            cases=tuple(cases),
            rules=RULES,
            steps=steps,
            path=path,
        )
        run_python(python, script)
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


def compare(ours: dict, ref: dict) -> dict:
    worst: dict[str, dict] = {}
    for key, a in ours.items():
        case, rule, step, leaf = key.split("|")
        b = ref[key].astype(np.float64)
        a = a.astype(np.float64)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = float(a.ravel() @ b.ravel() / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
        ratio = float(na / nb) if nb > 0 else float("nan")
        w = worst.setdefault(f"{case}|{rule}", {"cosine": 1.0, "norm_ratio_dev": 0.0, "leaves": 0})
        w["cosine"] = min(w["cosine"], cos)
        w["norm_ratio_dev"] = max(w["norm_ratio_dev"], abs(ratio - 1))
        w["worst_leaf"] = w.get("worst_leaf") if w["cosine"] < cos else f"{leaf}@{step}"
        w["leaves"] += 1
    return worst


def add_arguments(parser):
    parser.add_argument("--reference-python", default=None, help="default: .refenv/bin/python")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated names")


def run(args):
    if args.quick:
        args.cases, args.steps = "scanned", 3
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {list(CASES)}")
    ref_python = reference_python(args.reference_python)
    if ref_python is None or not Path(ref_python).exists():
        raise SystemExit("no reference environment: bash benchmarks/setup_reference.sh")
    ours = updates(
        sys.executable,
        "(lambda r: getattr(wk, 'scale_by_' + r))",
        "import wkron_eqx as wk",
        args.steps,
        cases,
    )
    ref = updates(
        ref_python,
        "(lambda r: getattr(ref, 'scale_by_' + r))",
        "from eformer.optimizers._tx import white_kron as ref",
        args.steps,
        cases,
    )
    worst = compare(ours, ref)
    lines = [
        "| case | rule | leaves x steps | min cosine | max abs(norm ratio - 1) |",
        "|---|---|---|---|---|",
    ]
    for key, w in worst.items():
        case, rule = key.split("|")
        lines.append(
            f"| {case} | {rule} | {w['leaves']} | {w['cosine']:.6f} | {w['norm_ratio_dev']:.4%} |"
        )
    text = "\n".join(lines)
    print(f"parity over {args.steps} steps (float32, noise_scale=0), worst leaf per case:\n")
    print(text)
    notes = f"{args.steps} steps, float32, `noise_scale=0`; the worst leaf and step per case."
    write_results(args, worst, text, title="Parity with the reference", notes=notes)
    return worst
