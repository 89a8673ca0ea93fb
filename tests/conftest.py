"""Shared test helpers: the repository root on sys.path, and a runner for the real scripts."""

import os
import subprocess
import sys

# One intra-op thread: the test networks are tiny, and with more threads than free cores torch's
# thread pool spins and a test runs several times slower (measured 27 s vs 5 s for a 20-step run
# beside two busy processes). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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


class SimulatedCrash(Exception):
    pass


def run_until_crash(monkeypatch, main, argv, crash_when):
    """Run main(argv) but raise SimulatedCrash right after the first checkpoint whose state
    satisfies crash_when(state) has been written (a kill at that moment); the file stays."""
    import common

    real_save = common.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if crash_when(state):
            raise SimulatedCrash

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(SimulatedCrash):
            main(argv)
    finally:
        monkeypatch.setattr(common, "save_checkpoint", real_save)
