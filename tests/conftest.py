"""Shared test helpers: the repository root on sys.path, and a runner for the real scripts."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_script(args, cwd=None, timeout=600, env=None):
    """Run `python <args...>` from the repository root; returns the CompletedProcess.

    The tests run the real scripts as a user would, in a subprocess, on tiny settings.
    """
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_torchrun(nproc, args, timeout=600, env=None):
    """`torchrun --nproc_per_node=nproc args...` on the CPU (gloo), via `python -m torch.distributed.run`."""
    extra = {"CUDA_VISIBLE_DEVICES": ""}
    extra.update(env or {})
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       *args], timeout=timeout, env=extra)


@pytest.fixture
def runner():
    return run_script
