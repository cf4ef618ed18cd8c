"""Progress: a bar where someone watches (a terminal, a notebook), nothing in a log or CI."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from actorlib.progress import Progress
with Progress(3, "warming up") as p:
    for _ in range(3):
        p.update()
print("done")
"""


def run(env_value: str | None) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "ACTORLIB_PROGRESS"}
    if env_value is not None:
        env["ACTORLIB_PROGRESS"] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env, check=True)


def test_a_bar_when_interactive_and_silence_otherwise():
    shown = run("1")  # as in a terminal
    assert "warming up" in shown.stderr and "/3" in shown.stderr and shown.stdout == "done\n"
    quiet = run(None)  # stderr is a pipe here: not interactive
    assert quiet.stderr == "" and quiet.stdout == "done\n"
    off = run("0")
    assert off.stderr == ""
