"""examples/notebook.ipynb runs top to bottom in a real Jupyter kernel, says what it promises, and leaves nothing."""

import ast
import json
import os
import queue
import sys
import time

import pytest

from .conftest import ROOT_DIR, alive, descendants, wait_for

nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to execute the notebook (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = os.path.join(ROOT_DIR, "examples", "notebook.ipynb")
CELL_TIMEOUT = 60  # seconds, for each cell


def stream_text(cell) -> str:
    """What the cell printed to stdout (stderr carries progress counters and log warnings)."""
    return "".join(out["text"] for out in cell.outputs if out["output_type"] == "stream" and out["name"] == "stdout")


def result_text(cell) -> str:
    results = [out["data"]["text/plain"] for out in cell.outputs if out["output_type"] == "execute_result"]
    assert len(results) == 1, f"cell {cell.id!r}: expected one result, got outputs {cell.outputs}"
    return results[0]


def late_stream(client, needle: str, timeout: float = 5.0) -> float | None:
    """Seconds after the cell finished at which ``needle`` still arrived on iopub (None: it never did)."""
    from jupyter_core.utils import run_sync

    start = time.monotonic()
    seen = ""
    while time.monotonic() - start < timeout:
        try:
            msg = run_sync(client.kc.get_iopub_msg)(timeout=0.2)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
            if needle in seen:
                return time.monotonic() - start
    return None


@pytest.fixture
def python3_kernelspec(tmp_path, monkeypatch):
    """A ``python3`` kernel spec that runs ipykernel with this interpreter, ahead of any installed one."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before the user and system dirs
    return spec


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id!r} was stored with outputs"


def test_notebook_runs_in_a_kernel(tmp_path, python3_kernelspec):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, startup_timeout=60, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT_DIR, os.environ.get("PYTHONPATH")]))}
    env["ACTORLIB_TMPDIR"] = str(work)
    cells = {cell.id: cell for cell in nb.cells}
    started: set[int] = set()  # every process the kernel started, seen after each cell
    print_cell_late: float | None = None

    with client.setup_kernel(env=env):
        kernel_pid = client.km.provisioner.pid
        assert os.path.realpath(f"/proc/{kernel_pid}/exe") == os.path.realpath(sys.executable)
        for index, cell in enumerate(client.nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError if the cell fails
            started |= descendants(kernel_pid)
            if cell.id == "print" and "hello from the worker" not in stream_text(cell):
                print_cell_late = late_stream(client, "hello from the worker")
                break
        else:
            # after the last cell's actorlib.shutdown(), with the kernel still running
            wait_for(
                lambda: not descendants(kernel_pid),
                10,
                what=f"the kernel's child processes {sorted(descendants(kernel_pid))} to exit after shutdown()",
            )

    # The kernel is gone, and nothing it started is left.
    wait_for(lambda: not alive(kernel_pid), 10, what="the kernel to exit")
    wait_for(
        lambda: not [p for p in started if alive(p)],
        10,
        what=f"the kernel's processes {sorted(p for p in started if alive(p))} to exit with it",
    )

    # A worker's print shows under the cell that is running.
    out = stream_text(cells["print"])
    assert "hello from the worker" in out, f"the worker's print is not under its cell: {out!r}; " + (
        f"it arrived {print_cell_late:.3f} s after the cell finished (the log line lost the race with the result)"
        if print_cell_late is not None
        else "it never arrived"
    )
    pid = int(result_text(cells["print"]))
    assert f"(Counter pid={pid}) hello from the worker, pid {pid}\n" in out
    assert pid in started

    assert "'GPU': 4.0" in result_text(cells["init"])
    assert result_text(cells["sync"]) == "15"
    assert result_text(cells["sync-many"]) == "[16, 17, 18]"
    assert result_text(cells["await"]) == "118"  # top-level await of an ObjectRef
    assert result_text(cells["gather"]) == "[0, 2, 4, 6]"
    assert stream_text(cells["stream"]) == "item 0\nitem 1\nitem 4\nitem 9\nitem 16\n"
    assert result_text(cells["stream-async"]) == "[0, 1, 4, 9]"
    described = ast.literal_eval(result_text(cells["group"]))  # one call dispatched to all four workers
    assert described == [{"rank": r, "world_size": 4, "gpus": str(r)} for r in range(4)]
    assert result_text(cells["group-end"]) == "True"
    assert result_text(cells["shutdown"]) == "False"  # is_initialized() after shutdown()
    assert result_text(cells["reinit"]) == "7"  # a call after init() again
