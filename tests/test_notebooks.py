"""Execute every notebook in `notebooks/` so that none of them rots. Each notebook ends
with a cell of assertions on its own results; a failing cell fails the test."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 180


def test_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_quickstart", "02_anatomy", "03_ill_conditioned"]


def test_notebooks_match_their_build_script():
    """The committed cells are those of `notebooks/_build.py` (edit there, then rebuild)."""
    import nbformat

    spec = importlib.util.spec_from_file_location("_build", NOTEBOOKS[0].parent / "_build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert sorted(build.NOTEBOOKS) == [p.stem for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        stored = nbformat.read(path, as_version=4).cells
        written = build.NOTEBOOKS[path.stem]
        assert [(c.cell_type, c.source) for c in stored] == [
            (c.cell_type, c.source) for c in written
        ], path.name


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
