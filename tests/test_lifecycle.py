"""Starting, stopping, fate sharing and worker output: each test owns its processes."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from .conftest import alive, assert_no_leaks, descendants, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(tmp_path, body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(tmp_path / "sessions")}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_shutdown_leaves_nothing_and_init_works_again(fresh):
    actorlib = fresh

    @actorlib.remote
    class A:
        def pid(self):
            return os.getpid()

    for _ in range(2):
        actorlib.init(num_cpus=2)
        assert actorlib.is_initialized()
        pids = actorlib.get([A.remote().pid.remote() for _ in range(3)], timeout=30)
        assert set(pids) <= descendants()
        actorlib.shutdown()
        assert not actorlib.is_initialized()
        assert_no_leaks(timeout=5)
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [path for path in held if path.endswith("owner.lock")]  # its session has ended: prunable later
    actorlib.shutdown()  # twice is fine


_CHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def test_what_an_actor_starts_goes_with_it(fresh):
    """A process an actor starts, and what that one starts, end with the actor: killed, exited on its own, or
    at shutdown (as Ray kills a worker's child processes)."""
    actorlib = fresh

    @actorlib.remote
    class Starter:
        def start(self):
            child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
            self.child = child  # kept: a running Popen dropped warns (ResourceWarning)
            return [child.pid, int(child.stdout.readline())]

        def exit_now(self):
            os._exit(3)

    actorlib.init(num_cpus=3)
    killed, exits, stays = Starter.remote(), Starter.remote(), Starter.remote()
    started = {a: actorlib.get(a.start.remote(), timeout=60) for a in (killed, exits, stays)}
    assert all(alive(pid) for pids in started.values() for pid in pids)
    actorlib.kill(killed)
    wait_for(lambda: not any(alive(pid) for pid in started[killed]), timeout=30, what="a killed actor's processes")
    exits.exit_now.remote()
    wait_for(lambda: not any(alive(pid) for pid in started[exits]), timeout=30, what="an exited actor's processes")
    assert all(alive(pid) for pid in started[stays])
    actorlib.shutdown()
    wait_for(lambda: not any(alive(pid) for pid in started[stays]), timeout=30, what="processes at shutdown")


def test_double_init_is_a_clear_error(fresh):
    fresh.init(num_cpus=1)
    with pytest.raises(fresh.ActorLibError, match="already"):
        fresh.init()
    assert fresh.init(ignore_reinit_error=True)["session_dir"]


def test_calls_before_init_say_so(fresh):
    @fresh.remote
    class A:
        pass

    with pytest.raises(fresh.ActorLibError, match="init"):
        A.remote()


def test_driver_sigkill_takes_every_worker_within_5_seconds(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time, actorlib
            actorlib.init(num_cpus=2)
            @actorlib.remote
            class A:
                def pid(self):
                    return os.getpid()
                def start(self):  # a process of its own, which starts another: they go too
                    self.child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
                    return [self.child.pid, int(self.child.stdout.readline())]
            actors = [A.remote() for _ in range(3)]
            started = actorlib.get(actors[0].start.remote(), timeout=60)
            pids = actorlib.get([a.pid.remote() for a in actors], timeout=60)
            print(" ".join(str(p) for p in pids + started), flush=True)
            time.sleep(600)
            """
        ).replace("import os, sys, time, actorlib", f"import os, subprocess, sys, time, actorlib\nCHILD = {_CHILD!r}")
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(tmp_path / "sessions")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        worker_pids = [int(p) for p in line.split()]
        assert len(worker_pids) == 5
        everything = descendants(proc.pid)
        assert set(worker_pids) <= everything  # the actor's child and grandchild too
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in everything), 5, what="orphaned workers to die")
        assert time.monotonic() - t0 <= 5
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert_no_leaks()


def test_worker_output_reaches_the_driver_and_the_log_files(tmp_path):
    out = run_script(
        tmp_path,
        """
        import sys, glob, os, actorlib
        info = actorlib.init(num_cpus=1)
        @actorlib.remote
        class Talker:
            def say(self, text):
                print(text)
                print("to stderr", text, file=sys.stderr)
                return os.getpid()
        t = Talker.options(name="talker").remote()
        pid = actorlib.get(t.say.remote("hello there"), timeout=30)
        u = Talker.remote()
        pid2 = actorlib.get(u.say.remote("second"), timeout=30)
        sys.stdout.write(f"PIDS {pid} {pid2}" + chr(10))  # one write: worker lines may interleave between a print's pieces
        sys.stdout.flush()
        actorlib.shutdown()
        logs = sorted(glob.glob(os.path.join(info["session_dir"], "logs", "*")))
        print("LOGS", " ".join(os.path.basename(p) for p in logs))
        print("CONTENT", open([p for p in logs if p.endswith(".out") and str(pid) in p][0]).read().strip())
        """,
    )
    assert out.returncode == 0, out.stderr
    pid, pid2 = out.stdout.split("PIDS ")[1].split()[:2]
    assert f"(talker pid={pid}) hello there" in out.stdout
    assert f"(Talker pid={pid2}) second" in out.stdout
    assert f"(talker pid={pid}) to stderr hello there" in out.stderr
    assert "CONTENT hello there" in out.stdout
    assert f"-{pid}.err" in out.stdout


def test_log_to_driver_false_keeps_output_in_files_only(tmp_path):
    out = run_script(
        tmp_path,
        """
        import actorlib
        actorlib.init(num_cpus=1, log_to_driver=False)
        @actorlib.remote
        class Talker:
            def say(self):
                print("quiet please")
        actorlib.get(Talker.remote().say.remote(), timeout=30)
        actorlib.shutdown()
        print("END")
        """,
    )
    assert out.returncode == 0, out.stderr
    assert "quiet please" not in out.stdout and "END" in out.stdout


def test_classes_and_functions_from_main_work(tmp_path):
    out = run_script(
        tmp_path,
        """
        import actorlib

        def helper(x):
            return x * 3

        class Payload:
            def __init__(self, v):
                self.v = v

        @actorlib.remote
        class UsesMain:
            def run(self, p):
                return helper(p.v)

        actorlib.init(num_cpus=1)
        print("RESULT", actorlib.get(UsesMain.remote().run.remote(Payload(14)), timeout=30))
        """,
    )
    assert out.returncode == 0, out.stderr
    assert "RESULT 42" in out.stdout


def test_shutdown_says_nothing_of_its_own_heartbeats(tmp_path):
    # Heartbeats every 0.2 s: one answered after driver_exit made a stopping driver print that it was
    # joining again (most times, with workers to stop).
    script = """
        import actorlib, time

        @actorlib.remote
        class A:
            def f(self):
                return 1

        for _ in range(5):
            actorlib.init(num_cpus=2)
            actorlib.get([a.f.remote() for a in [A.remote(), A.remote()]], timeout=30)
            time.sleep(0.3)
            actorlib.shutdown()
        print("done")
    """
    script_path = tmp_path / "driver.py"
    script_path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(tmp_path / "sessions"), "ACTORLIB_NODE_TIMEOUT_S": "1"}
    out = subprocess.run([sys.executable, str(script_path)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    for said in ("registering again", "declared", "did not finish cleanly"):
        assert said not in out.stderr, out.stderr


def test_ended_sessions_beyond_the_newest_kept_are_removed(tmp_path):
    from scheduler.session import prune_sessions

    root = tmp_path / "sessions"
    root.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    legacy = root / f"session_20200101-000000_{int(gone.stdout)}_aaaa"  # made before sessions were held; its maker is gone
    (root / "session_20200101-000000_1_bbbb" / "logs").mkdir(parents=True)  # ... and one whose maker runs: kept
    (legacy / "logs").mkdir(parents=True)
    elsewhere = tempfile.mkdtemp(prefix="actorlib-", dir="/tmp")  # its sockets, recorded as kept outside
    (legacy / "sockets_dir").write_text(elsewhere)
    orphan = tempfile.mkdtemp(prefix="actorlib-", dir="/tmp")  # the socket directory of a session removed by hand
    with open(os.path.join(orphan, "session_dir"), "w") as f:
        f.write(str(root / "session_20200101-000000_2_bbbb"))
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(root), "ACTORLIB_KEEP_SESSIONS": "1000"}
    make = "from scheduler.session import new_session_dir; print(new_session_dir(), flush=True); input()"
    holders = [subprocess.Popen([sys.executable, "-c", make], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    try:
        made = [h.stdout.readline().strip() for h in holders]
        assert all(os.path.isdir(m) for m in made)
        assert prune_sessions(str(root), keep=0) == [str(legacy)]  # the three are in use
        assert not os.path.exists(elsewhere) and not os.path.exists(orphan)
        for h in holders[:2]:
            h.communicate("\n", timeout=30)
        # two have ended: the newer of them is kept, the older goes; the one still held stays
        assert prune_sessions(str(root), keep=1) == [min(made[:2])]
        assert os.path.isdir(made[2])
    finally:
        for h in holders:
            if h.poll() is None:
                h.kill()
            h.communicate(timeout=30)
