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


def _load():
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))  # importable by name: its IPC child is spawned
    return importlib.import_module("gpu_check")


@pytest.mark.timeout(240)
def test_the_checks_code_runs_on_cpu(tmp_path):
    # the same functions the GPU run calls, on CPU tensors and our server on the CPU, so the
    # day a GPU is lent is not spent on a typo; their thresholds hold here too
    g = _load()
    rows = g.check_logprob(rows=64, vocab=2048, device="cpu", backend="torch")
    rows += g.check_ipc(device="cpu", rows=64)
    rows += g.check_server_and_parity(tmp_path, device="cpu", dtype="float32")
    assert len(rows) == 7
    failed = [(label, measured, note) for label, ok, measured, note in rows
              if not ok and "GB/s" not in label]  # CPU bandwidth proves nothing
    assert not failed, failed
