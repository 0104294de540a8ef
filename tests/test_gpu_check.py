"""gpu_check.py where no GPU is: it says so and passes, and its check runner reports each check on one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
from config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, "gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no GPU:") and len(done.stdout.splitlines()) == 1


def test_unknown_check_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any GPU work
    with pytest.raises(ConfigError, match=r"unknown checks \['flash'\]"):
        gpu_check.main(["--only=flash"])


def test_runner_reports_every_check_and_goes_on_after_a_failure(capsys):
    def fails(context):
        raise AssertionError("loss went up")

    def skips(context):
        raise gpu_check.Skip("1 GPU: needs two")

    results = gpu_check.run_checks([("first", fails), ("second", skips), ("third", lambda context: "fine")], {})
    assert results == [("FAIL", "first", "AssertionError: loss went up"), ("SKIP", "second", "1 GPU: needs two"),
                       ("PASS", "third", "fine")]
    assert capsys.readouterr().out.splitlines() == ["FAIL first: AssertionError: loss went up",
                                                    "SKIP second: 1 GPU: needs two", "PASS third: fine"]
