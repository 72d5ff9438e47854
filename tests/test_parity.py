"""Parity with eformer 0.0.101, run in its own environment (`.refenv`, made by
`bash benchmarks/setup_reference.sh`; CI makes it before the tests).

Without that environment the test is skipped, unless `WKRON_REQUIRE_REFERENCE=1` (set by
`.ci/run`), where a missing environment is a failure: CI cannot skip it by accident.

Two cases by default, which between them hold every leaf kind (dense tiles with edge
tiles, scanned stacks, 1-D leaves, large leaves with a diagonal left side, a diagonal right
side, or both); compiling the two implementations dominates the cost, about 40 s a case.
`WKRON_PARITY_CASES=all` (or a comma-separated list) runs others; `python -m benchmarks
parity` runs all five and records them in `benchmarks/results/parity.json`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = os.environ.get("WKRON_REFERENCE_PYTHON", str(ROOT / ".refenv/bin/python"))
REQUIRED = os.environ.get("WKRON_REQUIRE_REFERENCE") == "1"
CASES = os.environ.get("WKRON_PARITY_CASES", "scanned,both_diagonal")


@pytest.mark.slow
@pytest.mark.skipif(
    not REQUIRED and not Path(REFERENCE_PYTHON).exists(),
    reason="reference environment missing (bash benchmarks/setup_reference.sh)",
)
def test_parity_with_reference(tmp_path):
    assert Path(REFERENCE_PYTHON).exists(), f"no reference environment at {REFERENCE_PYTHON}"
    # The benchmark's own command, in a subprocess: both implementations run in
    # interpreters of their own anyway, and this process's jax configuration (strict
    # promotion, runtime type checks) stays out of them. Without `--cases` it runs all of
    # its cases; its results go to `tmp_path`, not to `benchmarks/results/`.
    command = [sys.executable, "-m", "benchmarks", "parity", "--results-dir", str(tmp_path)]
    command += ["--reference-python", REFERENCE_PYTHON, "--steps", "12"]
    command += [] if CASES == "all" else ["--cases", CASES]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    output = tmp_path / "parity.json"
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    worst = json.loads(output.read_text())
    cases = {key.split("|")[0] for key in worst}
    if CASES == "all":
        assert cases >= {"scanned", "both_diagonal"}, sorted(cases)
    else:
        assert cases == set(CASES.split(",")), sorted(cases)
    # every case compared for both rules, and nothing else
    assert set(worst) == {f"{c}|{r}" for c in cases for r in ("quad", "skew")}
    for key, w in worst.items():
        assert w["cosine"] > 0.999, (key, w)
        assert w["norm_ratio_dev"] < 0.02, (key, w)
