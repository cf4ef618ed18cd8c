"""actorlib.testing as a user's suite sees it: the fixtures, their markers, the leak check and the timeout."""

from __future__ import annotations

import textwrap

import pytest


@pytest.mark.actorlib(num_cpus=2, num_gpus=2)
def test_the_cluster_fixture_takes_init_arguments_from_its_marker(actorlib_cluster):
    assert actorlib_cluster.cluster_resources() == {"CPU": 2.0, "GPU": 2.0}

    @actorlib_cluster.remote(num_gpus=1)
    class Gpu:
        def ids(self):
            return actorlib_cluster.get_gpu_ids()

    assert sorted(actorlib_cluster.get([Gpu.remote().ids.remote() for _ in range(2)])) == [[0], [1]]


@pytest.mark.actorlib(num_cpus=1, num_gpus=0)
@pytest.mark.actorlib_nodes([{"num_cpus": 1, "num_gpus": 2, "resources": {"big": 1}}, {"num_cpus": 1}])
def test_the_multinode_fixture_starts_one_agent_per_entry(actorlib_multinode):
    al = actorlib_multinode.actorlib
    nodes = {n["node_id"]: n for n in al.nodes()}
    assert set(nodes) == {actorlib_multinode.head_node_id, *actorlib_multinode.node_ids}
    big = actorlib_multinode.node_ids[0]
    assert nodes[big]["resources"] == {"CPU": 1.0, "GPU": 2.0, "big": 1.0}

    @al.remote(resources={"big": 1})
    class Where:
        def node(self):
            return al.get_runtime_context().get_node_id()

    assert al.get(Where.remote().node.remote()) == big


def test_a_users_suite_sees_leaks_and_hangs_as_failures(pytester):
    pytester.makeconftest('pytest_plugins = ["actorlib.testing"]\n')
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            import subprocess, sys, time
            import pytest

            def test_fine(actorlib_cluster):
                @actorlib_cluster.remote
                class A:
                    def f(self):
                        return 1
                assert actorlib_cluster.get(A.remote().f.remote()) == 1

            @pytest.mark.actorlib(num_gpus=0)
            def test_leaks_a_process(actorlib_cluster):
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

            @pytest.mark.actorlib_timeout(2)
            def test_hangs(actorlib_cluster):
                time.sleep(60)

            @pytest.mark.actorlib_timeout(2)
            def test_hangs_and_catches_everything_it_can(actorlib_cluster):
                for _ in range(60):
                    try:
                        time.sleep(1)
                    except Exception:
                        pass
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "actorlib_leak_timeout=1", timeout=120)
    result.assert_outcomes(passed=2, failed=2, errors=1)
    result.stdout.fnmatch_lines(["*ProcessLeakError: 1 process(es) still running*time.sleep(120)*"])
    result.stdout.fnmatch_lines(["*DeadlineExceeded: *test_hangs took longer than 2 s (actorlib_timeout)*"])
    result.stdout.fnmatch_lines(["*DeadlineExceeded: *test_hangs_and_catches_everything_it_can took longer than 2 s*"])
