"""Mutation check: do the fast tests catch one-line changes to the maths?

    python tools/mutations.py [--only NAME ...] [--timeout 300] [--output PATH]

It tests the tests, so it is a tool, not a benchmark. The package and the tests are first
copied to a temporary snapshot, so that edits made to the working tree meanwhile do not
mix into the run. Each mutation replaces
one exact piece of text in one file of `wkron_eqx/` (it must occur there exactly once,
or the mutation is reported as invalid and not run): the snapshot is copied again, the
mutation applied to that copy, and the tests marked `fast` run there (`pytest -x -m
fast`, stopping at the first failure). The real tree is never written to. A mutation is
*killed* when a test fails (the first failing test is recorded) and *survives* when all
pass. Before any mutation, the unmutated snapshot must pass the same tests, and must be
the package those tests import.

Prints a Markdown table and writes it to `--output` (default
`benchmarks/results/mutations.md`). Sequential: about a minute per surviving mutation on
two CPU cores, less for a killed one.
"""

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


ROOT = Path(__file__).resolve().parents[1]

# The tests run against each mutant: those marked `fast` (pyproject.toml's `markers`),
# in pytest's collection order.
PYTEST = (sys.executable, "-m", "pytest", "-m", "fast", "-q", "-p", "no:cacheprovider")

# What a copy needs to run them (the tests' trees are in `tests/`).
COPIED = ("wkron_eqx", "tests", "pyproject.toml")
SKIPPED_WHEN_COPYING = shutil.ignore_patterns("__pycache__", ".hypothesis", "results")


class Mutation(NamedTuple):
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str


MUTATIONS = (
    Mutation(
        "no noise on 1-D leaves",
        "wkron_eqx/_kinds/one_d.py",
        "add_noise(x, ctx.step, ctx.noise_scale)",
        "x",
    ),
    Mutation(
        "no noise on dense tiles",
        "wkron_eqx/_kinds/dense.py",
        "Gn = add_noise(G, ctx.step, ctx.noise_scale, valid, real)",
        "Gn = G",
    ),
    Mutation(
        "no noise on large leaves' strips",
        "wkron_eqx/_kinds/large.py",
        "noisy = add_noise(strips, ctx.step, ctx.noise_scale, valid)",
        "noisy = strips",
    ),
    Mutation(
        "power iteration: 2 steps, not 10",
        "wkron_eqx/_norms.py",
        "POWER_ITERATIONS = 10",
        "POWER_ITERATIONS = 2",
    ),
    Mutation(
        "Lipschitz decay 0.9, not 0.95",
        "wkron_eqx/_norms.py",
        "0.95 * L + 0.05 * ell",
        "0.9 * L + 0.05 * ell",
    ),
    Mutation(
        "Lipschitz statistic without + c",
        "wkron_eqx/_kron.py",
        "track_lipschitz(L, _norm_bound(A) + c)",
        "track_lipschitz(L, _norm_bound(A))",
    ),
    Mutation(
        "z = lr, not lr / L",
        "wkron_eqx/_kron.py",
        "rule.step_scale * lr / jnp.where(L > 0, L, 1)",
        "rule.step_scale * lr",
    ),
    Mutation(
        "left factor gets the right c",
        "wkron_eqx/_kron.py",
        "Ql, Ll = _move(ctx.rule, Ql, A_left, c_left, Ll, ctx.lr)",
        "Ql, Ll = _move(ctx.rule, Ql, A_left, c_right, Ll, ctx.lr)",
    ),
    Mutation(
        "QUAD full steps (step_scale 1.0, not 0.5)",
        "wkron_eqx/_rules/quad.py",
        "step_scale: ClassVar[float] = 0.5",
        "step_scale: ClassVar[float] = 1.0",
    ),
    Mutation(
        "QUAD without symmetrising (P, not (P + P^T)/2)",
        "wkron_eqx/_rules/quad.py",
        "return (P + P.T) / 2",
        "return P",
    ),
    Mutation(
        "Procrustes rotation bound 1/4, not 1/8",
        "wkron_eqx/_rules/procrustes.py",
        "_MAX_ROTATION = 1 / 8",
        "_MAX_ROTATION = 1 / 4",
    ),
    Mutation(
        "Procrustes step never shortened",
        "wkron_eqx/_rules/procrustes.py",
        "a = jnp.where(tr_RRQ < 0, jnp.minimum(a, shortened), a)",
        "a = a",
    ),
    Mutation(
        "RMS clip at 1.0, not 1.1",
        "wkron_eqx/_transform.py",
        "_CLIP_RMS = 1.1",
        "_CLIP_RMS = 1.0",
    ),
    Mutation(
        "adam-style divisor 4, not 5",
        "wkron_eqx/_transform.py",
        "_ADAM_STYLE_DIVISOR = 5.0",
        "_ADAM_STYLE_DIVISOR = 4.0",
    ),
    Mutation(
        "never balance (not every 100 steps)",
        "wkron_eqx/_transform.py",
        "balance=(t % 100) == 0",
        "balance=(t % 100) == 100",
    ),
    Mutation(
        "no bias correction of the momentum",
        "wkron_eqx/_transform.py",
        "corrected = optax.tree.bias_correction(f32(new_mu), config.b1, t_float)",
        "corrected = f32(new_mu)",
    ),
    Mutation(
        "step size floored at 0.4 (the reference's), not min(lr, 0.4)",
        "wkron_eqx/_transform.py",
        "min(lr, 0.4))",
        "0.4)",
    ),
    Mutation(
        "no non-finite guard",
        "wkron_eqx/_transform.py",
        "ok = jnp.all(jnp.isfinite(sum_sqs))",
        "ok = jnp.array(True)",
    ),
    Mutation(
        "refresh one step late (counter > 1/p, not >=)",
        "wkron_eqx/_transform.py",
        ">= 1.0 / p",
        "> 1.0 / p",
    ),
)


class Outcome(NamedTuple):
    status: str  # "killed", "survived", "invalid", "timeout" or "error"
    detail: str  # the first failing test, or why
    seconds: float


def _copy_tree(source_root: Path, destination: Path) -> None:
    for name in COPIED:
        source = source_root / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=SKIPPED_WHEN_COPYING)
        else:
            shutil.copy2(source, destination / name)


def _environment(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")


def _imported_from(tree: Path) -> Path:
    code = "import wkron_eqx; print(wkron_eqx.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env=_environment(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip()).resolve()


def _selected_files(tree: Path) -> collections.Counter[str]:
    """The files of the tests marked `fast` in `tree`, and how many each holds."""
    done = subprocess.run(
        [*PYTEST, "--collect-only"],
        cwd=tree,
        env=_environment(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    return collections.Counter(line.split("::")[0] for line in lines if "::" in line)


def _run_tests(tree: Path, timeout: float) -> Outcome:
    start = time.monotonic()
    process = subprocess.Popen(
        [*PYTEST, "-x", "-rfE"],
        cwd=tree,
        env=_environment(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout ends all of it
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return Outcome("timeout", f"no result in {timeout:.0f} s", time.monotonic() - start)
    seconds = time.monotonic() - start
    first = re.search(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if process.returncode == 0:
        return Outcome("survived", "", seconds)
    if process.returncode == 1 and first:
        return Outcome("killed", first.group(2), seconds)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    where = f"{first.group(1)} {first.group(2)}" if first else last
    return Outcome("error", f"pytest exit {process.returncode}: {where}", seconds)


def check_mutation(snapshot: Path, mutation: Mutation) -> str | None:
    """Why the mutation cannot be applied to the snapshot, or None."""
    path = snapshot / mutation.path
    if not path.exists():
        return f"{mutation.path} does not exist"
    count = path.read_text().count(mutation.original)
    if count != 1:
        return f"original text found {count} times in {mutation.path}"
    return None


def run_mutation(snapshot: Path, mutation: Mutation, timeout: float) -> Outcome:
    problem = check_mutation(snapshot, mutation)
    if problem is not None:
        return Outcome("invalid", problem, 0.0)
    with tempfile.TemporaryDirectory(prefix="wkron_mutant_") as tmp:
        tree = Path(tmp)
        _copy_tree(snapshot, tree)
        target = tree / mutation.path
        source = target.read_text()
        target.write_text(source.replace(mutation.original, mutation.replacement, 1))
        return _run_tests(tree, timeout)


def baseline(snapshot: Path, timeout: float) -> tuple[Outcome, collections.Counter[str]]:
    """The unmutated snapshot: it must be what the tests import, and must pass. Also
    returns the files of the tests marked `fast`, with their counts."""
    with tempfile.TemporaryDirectory(prefix="wkron_baseline_") as tmp:
        tree = Path(tmp)
        _copy_tree(snapshot, tree)
        imported = _imported_from(tree)
        if not imported.is_relative_to(tree.resolve()):
            raise SystemExit(f"the copy imports wkron_eqx from {imported}, not from {tree}")
        return _run_tests(tree, timeout), _selected_files(tree)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def table(rows: list[tuple[Mutation, Outcome]]) -> str:
    lines = [
        "| # | mutation | file | result | first failing test | s |",
        "|---|---|---|---|---|---|",
    ]
    for i, (m, o) in enumerate(rows, 1):
        detail = f"`{o.detail}`" if o.status == "killed" else o.detail
        lines.append(
            f"| {i} | {m.name} | `{m.path.removeprefix('wkron_eqx/')}` | {o.status} | "
            f"{detail} | {o.seconds:.0f} |"
        )
    killed = sum(o.status == "killed" for _, o in rows)
    valid = sum(o.status in ("killed", "survived") for _, o in rows)
    lines.append("")
    lines.append(f"Killed {killed} of {valid} run mutations ({len(rows)} listed).")
    return "\n".join(lines)


def main(argv=None) -> list[tuple[Mutation, Outcome]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run the mutations whose names contain these")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/mutations.md"))
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    with tempfile.TemporaryDirectory(prefix="wkron_snapshot_") as tmp:
        snapshot = Path(tmp)
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "wkron_eqx", "tests")
        _copy_tree(ROOT, snapshot)
        base, selected = baseline(snapshot, args.timeout)
        print(f"baseline (no mutation): {base.status} in {base.seconds:.0f} s", flush=True)
        if base.status != "survived":
            raise SystemExit(f"the unmutated tree does not pass the fast tests: {base.detail}")
        rows = []
        for mutation in mutations:
            outcome = run_mutation(snapshot, mutation, args.timeout)
            rows.append((mutation, outcome))
            print(f"{mutation.name}: {outcome.status} {outcome.detail}", flush=True)
    dirty = " (with uncommitted changes)" if dirty else ""
    header = [
        "# Mutation check",
        "",
        f"`python tools/mutations.py`, on commit {commit}{dirty} of `wkron_eqx/` and "
        "`tests/`. Each mutation is one textual change of the maths; the tests marked "
        "`fast` ran on a copy with it, `pytest -x -m fast`:",
        "",
        *[f"- `{name}` ({count} tests)" for name, count in selected.items()],
        "",
        f"Unmutated, they pass in {base.seconds:.0f} s.",
        "",
        "",
    ]
    report = "\n".join(header) + table(rows) + "\n"
    print()
    print(report)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report)
    return rows


if __name__ == "__main__":
    main()
