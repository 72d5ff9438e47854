"""What every benchmark shares: the trees, the timing, the reference's environment and
the results.

- the trees are `tests/trees.py`'s (one definition for the benchmarks and the tests);
- `measure`, `compile_only` and `interleaved` time a program: compile excluded, the
  fastest of several calls or rounds (other load on a shared machine only ever adds
  time), the median kept beside it where it is reported;
- `run_python` runs code in another interpreter (the reference's virtual environment,
  made by `bash benchmarks/setup_reference.sh`, or a fresh one of ours) with the
  repository importable, and `reference_python` finds that environment;
- `write_results` writes `results/NAME.json` (the benchmark's own record, whose shape each
  benchmark keeps so that earlier files stay readable) and `results/NAME.md` (a header
  saying how it was run and on what, then the benchmark's Markdown table).

This module and the trees import only NumPy and JAX (no `wkron_eqx`), so the code that
`run_python` sends to the reference's environment imports them too.
"""

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from tests.trees import (
    MIXED_SHAPES as MIXED_SHAPES,
    TREES as TREES,
    abstract_tree as abstract_tree,
    broadcast_scanned as broadcast_scanned,
    is_shape as is_shape,
    materialise as materialise,
    mixed as mixed,
)


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_REFERENCE = ROOT / ".refenv" / "bin" / "python"


# ------------------------------------------------------------------------------ options


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark has."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of seconds to a minute; writes under the temporary directory",
    )
    parser.add_argument(
        "--results-dir",
        default=None,
        help="where NAME.json and NAME.md go (default benchmarks/results, or a temporary "
        "folder with --quick)",
    )
    parser.add_argument(
        "--results-name", default=None, help="the files' name (default: the benchmark's)"
    )


def results_dir(args: argparse.Namespace) -> Path:
    if args.results_dir is not None:
        return Path(args.results_dir)
    if args.quick:  # a smoke run never overwrites a recorded result
        return Path(tempfile.gettempdir()) / "wkron_benchmarks_quick"
    return RESULTS


def results_name(args: argparse.Namespace, default: str | None = None) -> str:
    return args.results_name or default or args.name


# -------------------------------------------------------------------------------- timing


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def measure(tx, params, grads, repeats: int = 20, warmup: int = 3, compiles: int = 2) -> dict:
    """Compile time, warm step time and state bytes of `tx.update`.

    The update is jitted as `jax.jit(tx.update)`; the state passed in is never reused
    after a call (the reference mutates its input state outside `jit`). The reported step
    time is the fastest of `repeats` warm steps (`step_ms`; the median is kept as
    `median_ms`) and the compile time the fastest of `compiles` cold compiles (caches
    cleared in between).
    """
    state = tx.init(params)
    compile_times = []
    for _ in range(compiles):
        jax.clear_caches()
        update = jax.jit(tx.update)
        start = time.perf_counter()
        compiled = update.lower(grads, state, params).compile()
        compile_times.append(time.perf_counter() - start)
    compile_s = min(compile_times)
    temp_bytes = _temp_bytes(compiled)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    for _ in range(warmup):
        out, state = compiled(grads, state, params)
        jax.block_until_ready((out, state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, state = compiled(grads, state, params)
        jax.block_until_ready((out, state))
        times.append(time.perf_counter() - start)
    finite = bool(all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out)))
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * min(times),
        "median_ms": 1e3 * statistics.median(times),
        "state_bytes": tree_bytes(state),
        "param_bytes": tree_bytes(params),
        "flops": flops,
        "finite": finite,
        "temp_bytes": temp_bytes,
    }


def _temp_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def compile_only(tx, params, grads) -> dict:
    """Lower and compile time (seconds, cold caches) and XLA temp memory of `tx.update`;
    `params` and `grads` may be `jax.ShapeDtypeStruct`s (nothing runs)."""
    state = jax.eval_shape(tx.init, params)
    jax.clear_caches()
    update = jax.jit(tx.update)
    start = time.perf_counter()
    lowered = update.lower(grads, state, params)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "temp_bytes": _temp_bytes(compiled),
    }


def interleaved(
    calls: dict[str, Callable], rounds: int, per_round: int = 1, warmup: int = 0
) -> dict[str, list[float]]:
    """Wall times (ms) of every call in `calls`, in rounds that visit them in turn
    (`per_round` consecutive calls each), so that a burst of other load falls on all of
    them alike. The first `warmup` rounds are run the same way and not kept. Each call
    returns what `jax.block_until_ready` waits for."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for turn in range(warmup + rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(call())
                if turn >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - start))
    return times


def keep_fastest(into: dict, rows: dict, fields=("step_ms", "median_ms", "compile_s")) -> None:
    """Merge `rows` (key -> record) into `into`, keeping the smaller value of each of
    `fields` that both have: the rounds of one benchmark, a row's best."""
    for key, row in rows.items():
        if key in into:
            for field in fields:
                if field in row and field in into[key]:
                    row[field] = min(row[field], into[key][field])
        into[key] = row


# ----------------------------------------------------------------- other interpreters


def reference_python(given: str | None = None) -> str | None:
    """The reference's interpreter: `given`, else `.refenv/bin/python` where it exists."""
    if given:
        return given
    return str(DEFAULT_REFERENCE) if DEFAULT_REFERENCE.exists() else None


def run_python(python: str, code: str, *argv: str, env: dict | None = None) -> str:
    """Run `code` (`python -c code *argv`) in the repository root with the root on
    `PYTHONPATH` (so `benchmarks._harness` and `tests.trees` import); returns its stdout
    and raises `RuntimeError` with the end of its stderr if it fails."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [python, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def last_json(stdout: str):
    """The JSON on the last line of an output."""
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ results


def environment() -> dict:
    """Where a result was measured."""
    device = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": device.device_kind,
    }


def read_results(args: argparse.Namespace, name: str | None = None):
    """The JSON record `write_results` wrote (None if there is none)."""
    path = results_dir(args) / f"{results_name(args, name)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_results(
    args: argparse.Namespace,
    record,
    table: str,
    *,
    title: str,
    notes: str = "",
    name: str | None = None,
    merge: Callable | None = None,
) -> Path:
    """Write `NAME.json` (`record`, or `merge(earlier record or None)` under a file lock,
    for benchmarks whose runs add up) and `NAME.md` (`# title`, how it was run, where,
    `notes`, then `table`, which may be a callable of the merged record). Returns the
    folder."""
    folder = results_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    name = results_name(args, name)
    json_path = folder / f"{name}.json"
    with open(json_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # runs in parallel merge into the same file
        if merge is not None:
            f.seek(0)
            text = f.read()
            record = merge(json.loads(text) if text.strip() else None)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record, indent=1) + "\n")
    if callable(table):
        table = table(record)
    where = environment()
    lines = [
        f"# {title} (`{args.command}`)",
        "",
        f"{where['date']}, {where['device']} ({where['backend']}), {where['machine']}, "
        f"jax {where['jax']}.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    (folder / f"{name}.md").write_text("\n".join(lines) + table.rstrip() + "\n")
    print(f"wrote {json_path} and {name}.md", flush=True)
    return folder
