"""A real Jupyter kernel: blocking get and top-level await in cells, worker prints, re-init, no leftovers."""

import importlib.util
import os
import queue
import time

import pytest

from .conftest import ROOT_DIR, alive, wait_for

jupyter_client = pytest.importorskip("jupyter_client")
# looked for, not imported: with ipykernel in sys.modules, every runtime of this test process would take itself
# for a notebook kernel's (its answers read by its loop), and the rest of the suite would test that path only
if importlib.util.find_spec("ipykernel") is None:
    pytest.skip("ipykernel is needed to start a kernel", allow_module_level=True)


@pytest.fixture
def kernel(tmp_path):
    km = jupyter_client.KernelManager(kernel_name="python3")
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path)}
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        yield km, kc
    finally:
        if km.is_alive():  # the test shuts the kernel down itself; this is for when it fails first
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def run_cell(kc, code: str, timeout: float = 90) -> str:
    """Execute a cell; return its stream output and result text. Errors fail the test."""
    out: list[str] = []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", "") + "\n")
        elif kind == "error":
            out.append("ERROR " + "\n".join(content["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    text = "".join(out)
    assert reply["content"]["status"] == "ok", text
    return text


def drain_streams(kc, until: str, timeout: float = 30) -> str:
    """Stream output arriving after a cell finished (worker prints come from another thread)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
            if until in "".join(seen):
                break
    return "".join(seen)


def test_actorlib_in_a_jupyter_kernel(kernel):
    km, kc = kernel
    run_cell(kc, "import actorlib, os\nactorlib.init(num_cpus=2)")
    run_cell(
        kc,
        "@actorlib.remote\nclass Cell:\n    def add(self, a, b):\n        return a + b\n"
        "    def shout(self, text):\n        print(text.upper())\n        return os.getpid()\n"
        "    def gen(self, n):\n        yield from range(n)\n",
    )
    assert "5" in run_cell(kc, "c = Cell.remote()\nactorlib.get(c.add.remote(2, 3), timeout=60)")  # blocking get in a cell
    assert "42" in run_cell(kc, "await c.add.remote(40, 2)")  # top-level await
    assert "[0, 1, 2]" in run_cell(kc, "[actorlib.get(r) for r in c.gen.remote(3)]")
    # values come back as the cell's result: a print's stream may reach iopub after the cell ends on a busy machine
    out = run_cell(kc, "pid = actorlib.get(c.shout.remote('hello from a worker'), timeout=60)\nf'PID {pid} END'")
    if "HELLO FROM A WORKER" not in out:
        out += drain_streams(kc, "HELLO FROM A WORKER")
    pid = int(out.split("PID ")[1].split()[0])
    assert f"(Cell pid={pid}) HELLO FROM A WORKER" in out
    # actorlib's own lines (the head's, from the loop) show under the running cell, not under init()'s
    out = run_cell(
        kc,
        "import sys, time\nr = Cell.options(max_restarts=1).remote()\nos.kill(actorlib.get(r.shout.remote('x'), timeout=60), 9)\n"
        "deadline = time.monotonic() + 60\nwhile True:\n"
        "    try:\n        actorlib.get(r.add.remote(1, 1), timeout=60)\n        break\n"
        "    except actorlib.ActorDiedError:\n        assert time.monotonic() < deadline\n"
        "sys.stderr.flush()\nprint('RESTARTED')",
    )
    assert "restarting (1 of 1)" in out and "RESTARTED" in out
    run_cell(kc, "actorlib.shutdown()")
    wait_for(lambda: not alive(pid), 10, what="the worker to exit after shutdown()")
    out = run_cell(
        kc, "actorlib.init(num_cpus=2)\nc = Cell.remote()\nf\"PID2 {actorlib.get(c.shout.remote('again'), timeout=60)} END\""
    )
    pid2 = int(out.split("PID2 ")[1].split()[0])
    assert alive(pid2)
    kc.stop_channels()
    km.shutdown_kernel(now=False)  # the kernel exits without calling shutdown(): nothing may be left
    wait_for(lambda: not alive(pid2), 10, what="the worker to exit with its kernel")
