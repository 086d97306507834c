"""benchmarks/gpu_check.py cannot run here; it must at least import, explain itself and refuse cleanly."""
import subprocess
import sys

import pytest
import torch

from helpers import ROOT


def test_help_lists_the_checks():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "logprob, ipc, server (with parity), zero3" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run the check itself")
def test_without_cuda_it_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
