"""`python -m benchmarks` lists the benchmarks; `python -m benchmarks NAME [--quick]
[options]` runs one (`python -m benchmarks NAME --help` for its options)."""

import os


# XLA's concurrency-optimised CPU scheduler can deadlock (the tests switch it off too).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import argparse
import importlib
import pkgutil
import shlex
import sys

import benchmarks
from benchmarks import _harness


def names() -> list[str]:
    """Every benchmark: the package's public modules."""
    found = pkgutil.iter_modules(benchmarks.__path__)
    return sorted(m.name for m in found if not m.name.startswith("_"))


def load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def listing() -> str:
    rows = [(name, load(name).DESCRIPTION) for name in names()]
    width = max(len(name) for name, _ in rows)
    lines = ["python -m benchmarks NAME [--quick] [options]; the benchmarks:", ""]
    lines += [f"  {name:<{width}}  {description}" for name, description in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing())
        return
    name, rest = argv[0], argv[1:]
    if name not in names():
        raise SystemExit(f"no benchmark {name!r}\n\n{listing()}")
    module = load(name)
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _harness.add_common_arguments(parser)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.name = name
    args.command = shlex.join(["python", "-m", "benchmarks", *argv])
    module.run(args)


if __name__ == "__main__":
    main()
