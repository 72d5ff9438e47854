"""More than one process: `examples/fsdp.py`'s training as two JAX processes of 4
simulated CPU devices each (gloo collectives over localhost) against one process of 8
(`_two_process.py`). Nothing in the layout assumes one host: the losses and the final
params are the one-process run's, and the state gathered from the two processes is a
checkpoint the one-process run restores mid-training and continues from."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np


_HERE = pathlib.Path(__file__).parent
_SCRIPT = str(_HERE / "_two_process.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}


def test_two_processes_train_as_one_and_their_checkpoint_restores(tmp_path):
    port = str(_free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, _SCRIPT, "worker", str(i), port, str(tmp_path)],
            env=_env(),
            cwd=_HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-4000:]
    checkpoint = tmp_path / "state_worker.npz"
    single = subprocess.run(
        [sys.executable, _SCRIPT, "single", str(tmp_path), str(checkpoint)],
        env=_env(),
        cwd=_HERE.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    two, one = np.load(tmp_path / "run_worker.npz"), np.load(tmp_path / "run_single.npz")
    # Steps before the restore: the one process's own training; after: from the two
    # processes' checkpoint. Both match the two processes bit for bit.
    assert two.files == one.files and len(two.files) > 1
    for name in two.files:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    assert two["losses"][-1] < two["losses"][0]
    with np.load(checkpoint) as saved:
        assert int(saved["arr_0"]) == 4  # the state's step count when it was saved
    specs = (tmp_path / "specs_worker.txt").read_text()
    assert specs == (tmp_path / "specs_single.txt").read_text() == "P('fsdp', None, None)"
