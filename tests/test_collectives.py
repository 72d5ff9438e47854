"""What a step with its factor stacks sharded over a pipeline axis communicates, read off
the compiled program on 4 simulated CPU devices (`_collectives.py`, in a subprocess).

With the stacks over `pp` and the params replicated, each leaf's preconditioned output is
gathered from the devices that hold its tiles (once per branch of the step), a compute
group that joins buckets moves some tiles between devices (collective permutes), and a
large leaf's strips are joined by a reduction. These are the counts of jax 0.10.2; a
change to where the step constrains its stacks must not add to them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest


_SCRIPT = Path(__file__).resolve().parent / "_collectives.py"
MEASURED_JAX = "0.10.2"
# Op kind -> [count, elements moved], per configuration of `_collectives.CONFIGS`.
MEASURED = {
    "quad": {"all-gather": [12, 14112], "collective-permute": [20, 6090], "all-reduce": [1, 7200]},
    "skew_p05_cache": {
        "all-gather": [16, 28192],
        "collective-permute": [32, 12170],
        "all-reduce": [1, 7200],
    },
    "quad_init_none": {
        "all-gather": [19, 14144],
        "collective-permute": [20, 6090],
        "all-reduce": [2, 7202],
    },
}


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run(
        [sys.executable, str(_SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _elements(moved: dict) -> int:
    return sum(elements for _, elements in moved.values())


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_the_step_moves_no_more_than_measured(report, name):
    """At most 10% more elements than measured (another XLA may fuse or split
    collectives differently), and less than the factors would be: far below twice the
    params per branch (the dense factors alone are several times the params here)."""
    moved = report[name]
    assert _elements(moved) <= 1.1 * _elements(MEASURED[name]), moved
    branches = 2 if "p05" in name else 1
    assert _elements(moved) <= 2 * branches * report["param_elements"], moved


@pytest.mark.hlo_exact
@pytest.mark.parametrize("name", sorted(MEASURED))
def test_the_collectives_are_those_measured(report, name):
    if jax.__version__ != MEASURED_JAX:
        pytest.skip(f"measured with jax {MEASURED_JAX}, this is {jax.__version__}: re-measure")
    assert report[name] == MEASURED[name]
