"""Subprocesses for the tests, always bounded in time: a run that should stop but does not fails its test after
`timeout` seconds, with the tail of its output, instead of hanging the suite."""

import os
import signal
import subprocess
import time

import pytest


def run(command, timeout, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs), except that the command
    runs in a session of its own and a timeout kills the whole session (torchrun's workers too, which would
    otherwise outlive it), then fails the test."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate(timeout=30)
            pytest.fail(f"{' '.join(map(str, command))} ran past {timeout} s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def join_spawned(context, timeout):
    """Wait for torch.multiprocessing.spawn(..., join=False)'s processes; past `timeout` seconds kill them and fail
    the test. A worker that fails raises here, as spawn(join=True) would."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join(timeout=30)
            pytest.fail(f"spawned processes ran past {timeout} s")
