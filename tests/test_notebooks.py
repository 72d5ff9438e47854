"""Execute every notebook in `notebooks/` so that none of them rots. Each notebook ends
with a cell of assertions on its own results; a failing cell fails the test."""

import os
import sys
from pathlib import Path

import pytest


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 180


def test_each_notebook_is_paired_with_its_percent_script():
    """Every `.ipynb` is paired (jupytext) with a `.py` in percent format holding the same
    cells: edit either, then `jupytext --sync notebooks/*.py`."""
    import jupytext
    import nbformat

    assert NOTEBOOKS
    for path in NOTEBOOKS:
        script = path.with_suffix(".py")
        assert script.exists(), f"{script.name} is missing: `jupytext --sync {path}`"
        stored = nbformat.read(path, as_version=4)
        assert stored.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
        paired = jupytext.read(script)
        assert [(c.cell_type, c.source) for c in paired.cells] == [
            (c.cell_type, c.source) for c in stored.cells
        ], f"{path.name} and {script.name} differ: `jupytext --sync {script}`"


def test_kernel_is_this_interpreter():
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert os.path.samefile(command[0], sys.executable)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    stored_images = _images(nb)
    NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()  # raises CellExecutionError on the first failing cell
    # the committed notebook holds its outputs, and running it makes the same plots
    assert stored_images > 0
    assert _images(nb) == stored_images
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def _images(nb) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
