"""A machine as one test's cluster sees it: a private session root, its own environment, the CLI.

Processes ``actorlib start``/``up`` leave behind are daemons (not children of
the test), so leaks are found by environment: every head, node, fork server
and worker inherits the test's private ``ACTORLIB_TMPDIR``, and
:meth:`Machine.processes` lists the living processes that carry it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from .conftest import ROOT_DIR, alive

CLI_TIMEOUT = 90


def tagged_processes(tag: str) -> set[int]:
    """Living processes whose environment has ``ACTORLIB_TMPDIR=tag``."""
    needle = f"ACTORLIB_TMPDIR={tag}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needle in env and alive(int(entry)):
                found.add(int(entry))
    return found


class Machine:
    """This machine as one test's cluster sees it: its own session root, environment and CLI."""

    def __init__(self, tmp: str, **env: str) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "ACTORLIB_TMPDIR": tmp, "PYTHONPATH": ROOT_DIR, **env}
        self.env.pop("ACTORLIB_ADDRESS", None)
        self.env.pop("ACTORLIB_KEY_FILE", None)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "actorlib.cli", *args], env=self.env, capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"actorlib {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def python(self, code: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd=ROOT_DIR,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def spawn_python(self, code: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT_DIR,
        )

    def spawn_python_file(self, path: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, path, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT_DIR
        )

    def processes(self) -> set[int]:
        return tagged_processes(self.tmp)

    def stop_all(self) -> None:
        """End of a test: ``actorlib stop``, then kill what is left, and fail the test if anything was."""
        self.cli("stop", check=False)
        left = self.processes()
        for pid in left:  # never leave them to the next test, but fail this one
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running: {sorted(left)}"


def end_process(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, reap it, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
