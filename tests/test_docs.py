"""The code in the docs runs.

The rule for anyone writing docs: a fenced block whose info string is exactly
``python`` is a complete program. Each one in README.md, docs/api.md and
docs/migrating-from-ray.md is run here on its own, in a fresh interpreter
(``sys.executable``, working directory the repository root), and must exit
with code 0 within BLOCK_TIMEOUT seconds and leave no process behind.

Anything not meant to run on its own uses another info string: ```py for
fragments and signatures (code that needs names from an earlier block, Ray
code, output), ```bash for shell, ```text for the rest.

Every runnable block starts a cluster, and the machine may have two cores:
prefer a few complete programs to many small ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from .conftest import ROOT_DIR, alive, assert_no_leaks, wait_for

DOCS = ["README.md", "docs/api.md", "docs/migrating-from-ray.md"]
BLOCK_TIMEOUT = 60.0

def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block whose info string is ``python``.

    Fences follow CommonMark: ``` or ~~~ (three or more), possibly indented; a block
    ends at a fence of the same character at least as long; its content is dedented
    by the opening fence's indentation.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip(" ")
        indent = len(lines[i]) - len(stripped)
        char = stripped[:1]
        if indent > 3 or char not in ("`", "~") or not stripped.startswith(char * 3):
            i += 1
            continue
        fence = char * (len(stripped) - len(stripped.lstrip(char)))
        info = stripped[len(fence) :].strip()
        body: list[str] = []
        i += 1
        start = i + 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence) and not closing.lstrip(char):
                break
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            i += 1
        i += 1
        if info.split(maxsplit=1)[:1] == ["python"]:
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def read(doc: str) -> str:
    with open(os.path.join(ROOT_DIR, doc), encoding="utf-8") as f:
        return f.read()


def collect() -> list:
    params = []
    for doc in DOCS:
        if not os.path.exists(os.path.join(ROOT_DIR, doc)):
            continue  # test_every_doc_has_runnable_code says so
        for index, (line, code) in enumerate(python_blocks(read(doc))):
            params.append(pytest.param(doc, index, line, code, id=f"{doc}#{index}"))
    return params


def carrying(item: bytes) -> list[int]:
    """Living processes whose environment holds ``item`` (``NAME=value``), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if item in environ and alive(int(entry)):
            found.append(int(entry))
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = "(gone)"
    return f"{pid}: {cmdline}"


def test_every_doc_has_runnable_code():
    for doc in DOCS:
        assert os.path.exists(os.path.join(ROOT_DIR, doc)), f"{doc} is missing"
        assert python_blocks(read(doc)), f"{doc} has no ```python block: nothing of it would be checked"


def test_the_fence_parser():
    text = "```python\na = 1\n```\n```py\nb\n```\n````md\n```python\nnot code\n```\n````\n  ```python\n  c = 2\n  ```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (13, "c = 2\n")]


@pytest.mark.parametrize(("doc", "index", "line", "code"), collect())
def test_block_runs(doc, index, line, code, tmp_path):
    script = tmp_path / f"{doc.replace('/', '_').replace('.', '_')}_block{index}.py"
    script.write_text(code)
    token = uuid.uuid4().hex  # every process the block starts inherits it: that is how leftovers are found
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT_DIR, os.environ.get("PYTHONPATH")) if p),
        "ACTORLIB_TMPDIR": str(tmp_path / "sessions"),
        "ACTORLIB_DOCS_BLOCK": token,
    }
    where = f"{doc} block {index} (its line 1 is line {line} of {doc})"
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files, not pipes: a leftover cannot hold them open
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: a timeout kills everything it started
        )
    try:
        proc.wait(timeout=BLOCK_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = _wait_gone(f"ACTORLIB_DOCS_BLOCK={token}".encode())
    report = f"--- stderr ---\n{err_path.read_text()}\n--- stdout (end) ---\n{out_path.read_text()[-3000:]}"
    assert not timed_out, f"{where} did not finish within {BLOCK_TIMEOUT:g} s\n{report}"
    assert proc.returncode == 0, f"{where} exited with {proc.returncode}\n{report}"
    assert not left, f"{where} left processes running (now killed):\n" + "\n".join(left)
    assert_no_leaks()


def _wait_gone(item: bytes, timeout: float = 10.0) -> list[str]:
    """Wait for every process carrying ``item`` to exit; kill and describe any that do not."""
    try:
        wait_for(lambda: not carrying(item), timeout, what="the block's processes to exit")
        return []
    except AssertionError:
        pids = carrying(item)
        left = [describe(pid) for pid in pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


def test_every_public_name_is_in_the_api_reference():
    import re

    import actorlib
    import actorlib.dag
    import actorlib.testing

    with open(os.path.join(ROOT_DIR, "docs", "api.md")) as f:
        reference = f.read()
    for module in (actorlib, actorlib.dag, actorlib.testing):
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", reference)]
        assert not missing, f"docs/api.md does not mention {module.__name__}.{', '.join(missing)}"
