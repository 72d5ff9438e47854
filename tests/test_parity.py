"""Parity with eformer 0.0.101 (runs only where its separate environment exists)."""

import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PYTHON = os.environ.get("WKRON_REFERENCE_PYTHON", str(ROOT / ".refenv/bin/python"))


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(REFERENCE_PYTHON).exists(),
    reason="reference environment missing (bash benchmarks/setup_reference.sh)",
)
def test_parity_with_reference():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    worst = parity.main(["--reference-python", REFERENCE_PYTHON, "--steps", "12"])
    assert set(worst) == {f"{c}|{r}" for c in parity.CASES for r in parity.RULES}
    for key, w in worst.items():
        assert w["cosine"] > 0.999, (key, w)
        assert w["norm_ratio_dev"] < 0.02, (key, w)
