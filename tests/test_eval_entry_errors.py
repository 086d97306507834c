"""The two entry points (train, eval) as a new user meets them: a model path that is no
directory and an unknown benchmark name end in exit 2 and one line on stderr, no traceback.
The real commands run in a subprocess, as a user would type them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from at_core.data import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.timeout(200)
@pytest.mark.parametrize("argv", [
    ["-m", "at_core.train", "--model-path"],
    ["examples/r1_1p5b.py", "--model-path"],
    ["examples/r1_7b.py", "--dry-run", "--model-path"],
    ["examples/tiny_r1.py", "--quick", "model.path="],
    ["-m", "at_core.eval", "--benchmarks", "math500", "--model"],
], ids=["train", "recipe", "recipe-dry-run", "tiny_r1", "eval"])
def test_a_missing_model_directory_is_named(tmp_path, argv):
    missing = tmp_path / "no" / "such-model"
    argv = argv[:-1] + [argv[-1] + str(missing)] if argv[-1].endswith("=") else argv + [str(missing)]
    if "at_core.train" in argv:
        argv += ["data.train_files=[data/train/math.json]"]
    err = run(*argv)
    assert err.startswith("error: ") and str(missing) in err
    assert "no such directory" in err or "does not exist" in err


@pytest.mark.timeout(120)
def test_a_model_path_without_config_json_is_named(tmp_path):
    err = run("-m", "at_core.eval", "--benchmarks", "math500", "--model", str(tmp_path))
    assert err == f"error: --model={tmp_path}: not an HF model directory (no config.json)"


@pytest.mark.timeout(120)
def test_an_unknown_benchmark_lists_the_known_names(tiny_model_dir, tmp_path):
    err = run("-m", "at_core.eval", "--model", str(tiny_model_dir), "--benchmarks", "math500,math5000",
              "--out", str(tmp_path))
    assert err == f"error: unknown benchmark 'math5000'; known: {', '.join(BENCHMARKS)}"
    assert not (tmp_path / "generations.jsonl").exists()  # checked before anything is written
