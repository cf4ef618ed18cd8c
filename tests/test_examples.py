"""The examples run as a user would run them, and say what they promise."""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT_DIR


def run_example(name: str, tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT_DIR, "examples", name)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    assert "add: 15" in out and "async: [0, 2, 4, 6, 8]" in out and "stream: [5, 4, 3, 2, 1]" in out
    assert "awaited: 115" in out and "caught: RemoteError[ValueError] - this actor refuses" in out
    assert "hello from the actor's process" in out


@pytest.mark.slow
def test_rl_worker_group(tmp_path):
    out = run_example("rl_worker_group.py", tmp_path)
    assert "trainer dp size 2, generation engines 2" in out
    assert "step 1: losses per dp shard [{'rank': 0, 'loss': 0.1406, 'gpu': '0'}, {'rank': 2, 'loss': 1.6406, 'gpu': '2'}]" in out
    assert "p2:2:6.00" in out


@pytest.mark.slow
def test_pipeline_executor(tmp_path):
    out = run_example("pipeline_executor.py", tmp_path)
    assert "PP=2 x TP=2 over gloo" in out or "PP=2 x TP=2 over nccl" in out
    if "over gloo" in out:  # two logical nodes: sorted by node, each worker sees its node's GPUs
        for rank, node, local in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)):
            assert f"node {node}, rank {rank}: pp {rank // 2} tp {rank % 2} local_rank {local} CUDA_VISIBLE_DEVICES=0,1" in out
    assert "matches the single-process reference: True" in out
    assert "pipelined: ['b0', 'b1', 'b2', 'b3'] all match the reference: True" in out
