"""The RL loop end to end with real engines, a real rollout server and real checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from at_core.recorder import read_metrics
from helpers import ROOT, torchrun

SMALL = [
    "data.tiny_train_size=40", "save_every=1", "stage.2.steps=0", "rollout.retries=1",
    *[f"stage.{s}.{k}" for s in (1, 2, 3) for k in
      ("prompts_per_step=4", "rollouts_per_prompt=2", "max_response_len=12")],
]


def _run(model_dir, out, *extra, nproc=None, timeout=420, env=None):
    args = ["--model-path", str(model_dir), "--out", str(out), *SMALL, *extra]
    if nproc:
        return torchrun(ROOT / "at_core" / "train.py", nproc, *args, timeout=timeout)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _steps(out):
    return [(r["stage"], r["step"], r["global_step"]) for r in read_metrics(out)]


@pytest.mark.timeout(600)
def test_one_process_run_writes_everything(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    _run(tiny_model_dir, out, "stage.1.steps=2", "stage.3.steps=1")
    assert _steps(out) == [("1", 1, 1), ("1", 2, 2), ("3", 1, 3)]
    rec = read_metrics(out)[0]
    for key in ("reward_mean", "accuracy", "think_rate", "think_rate/easy", "response_len/think",
                "response_len/no_think", "entropy", "clip_frac", "grad_norm", "lr", "time/rollout",
                "time/reward", "time/train", "time/sync", "tokens_per_s"):
        assert key in rec, key
    assert (out / "config.yaml").exists() and list((out / "tensorboard").iterdir())
    for stage in ("1", "2", "3"):  # stage 2 has 0 steps and still exports
        AutoModelForCausalLM.from_pretrained(out / "export" / f"stage{stage}")


@pytest.mark.timeout(600)
def test_two_launched_engines_share_the_threads_and_both_take_every_sync(tiny_model_dir, tmp_path):
    out = tmp_path / "engines"
    # MKL_NUM_THREADS in the environment: torch would take it over an engine's OMP_NUM_THREADS
    proc = _run(tiny_model_dir, out, "stage.1.steps=2", "stage.3.steps=0", "rollout.engines=2",
                env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert "2 rollout engine(s)" in proc.stderr
    for i in (0, 1):  # each single-threaded; a step's samples carry the synced version, so both were synced
        text = (out / f"rollout_server{i}.log").read_text()
        assert "(cpu, 1 torch threads)" in text and text.count("update_weights_from_tensor") >= 3


@pytest.mark.timeout(600)
def test_two_rank_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run2"
    _run(tiny_model_dir, out, "stage.1.steps=2", "stage.3.steps=0", nproc=2)
    assert [s[:2] for s in _steps(out)] == [("1", 1), ("1", 2)]


@pytest.mark.timeout(600)
def test_two_rank_run_under_the_deepspeed_launcher(tiny_model_dir, tmp_path):
    from helpers import free_port

    out = tmp_path / "run_ds"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "at_core/train.py", "--model-path", str(tiny_model_dir), "--out", str(out), *SMALL,
           "stage.1.steps=1", "stage.3.steps=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s[:2] for s in _steps(out)] == [("1", 1)]


@pytest.mark.timeout(900)
def test_sigkill_mid_run_then_resume_auto(tiny_model_dir, tmp_path):
    steps = ["stage.1.steps=6", "stage.3.steps=2"]  # room for the kill to land mid-run: a step is fast
    clean = tmp_path / "clean"
    _run(tiny_model_dir, clean, *steps)

    out = tmp_path / "killed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir), "--out", str(out),
           *SMALL, *steps]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(out)) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # somewhere inside step 3 or a little later
    proc.wait()
    assert 2 <= len(read_metrics(out)) < 8, "the kill should land mid-run"

    _run(tiny_model_dir, out, *steps, "--resume", "auto")
    expected = [("1", k, k) for k in range(1, 7)] + [("3", 1, 7), ("3", 2, 8)]
    assert _steps(out) == _steps(clean) == expected
    for a, b in zip(read_metrics(out), read_metrics(clean)):
        assert a["batch_digest"] == b["batch_digest"]  # same data order
        assert a["reward_mean"] == pytest.approx(b["reward_mean"])


def test_bad_config_key_names_valid_keys(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir),
                           "algorithm.lrr=1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "algorithm.lrr" in proc.stderr and "entropy_coef" in proc.stderr


def test_data_file_without_configured_field(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir),
                           f"data.train_files=[{bad}]"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "problem" in proc.stderr


def test_model_directory_without_chat_template(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, bare)
    conf = json.loads((bare / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(conf))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(bare), "--out",
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "chat template" in proc.stderr and "no_template" in proc.stderr


def test_unreachable_rollout_server_names_the_url(tiny_model_dir, tmp_path):
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir), "--out",
                           str(tmp_path / "run"), f"rollout.urls=[{url}]", "rollout.startup_timeout_s=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert url in proc.stderr


def _server_pids(parent_pid: int) -> list:
    """The rollout server processes a trainer started (they carry --parent-pid)."""
    from pathlib import Path

    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            args = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"at_rollout.server" in args and b"--parent-pid" in args:
            if args[args.index(b"--parent-pid") + 1] == str(parent_pid).encode():
                found.append(int(proc_dir.name))
    return found


@pytest.mark.timeout(600)
def test_server_killed_mid_run_is_restarted_and_the_run_goes_on(tiny_model_dir, tmp_path):
    out = tmp_path / "fault"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir), "--out", str(out), *SMALL,
           "stage.1.steps=4", "stage.3.steps=0", "save_every=0", "rollout.retries=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(out)) < 1:
        time.sleep(0.05)
    victims = _server_pids(proc.pid)
    assert victims, "the trainer should have started its rollout server"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-4000:]
    assert "restarting the server" in output
    assert _steps(out) == [("1", 1, 1), ("1", 2, 2), ("1", 3, 3), ("1", 4, 4)]  # nothing lost, nothing repeated
    assert _server_pids(proc.pid) == []  # and nothing left behind


def test_real_model_without_training_files_names_the_key(tiny_model_dir, tmp_path):
    import shutil

    real = tmp_path / "not_tiny"
    shutil.copytree(tiny_model_dir, real)
    conf = json.loads((real / "config.json").read_text())
    assert conf.pop("tiny_world") is True  # the tiny world marks its models
    (real / "config.json").write_text(json.dumps(conf))
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(real), "--out",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.train_files" in proc.stderr and "not_tiny" in proc.stderr and "Traceback" not in proc.stderr


_GRAD_NORM_SCRIPT = r"""
import json, sys, torch
from at_core.actor import backward_mini_batch, update_policy
from at_core.config import load_config
from at_core.engines import build_actor
from at_core.packing import Example

cfg = load_config(overrides=[f"deepspeed.zero_stage={sys.argv[2]}", "algorithm.lr=0.0", "model.dtype=fp32"])
engine = build_actor(sys.argv[1], cfg)
examples = [Example([5, 6, 7], [8, 9, 10, 11], advantage=1.0), Example([5, 6, 7], [12, 13], advantage=-1.0)]
stats = update_policy(engine, examples, cfg.algorithm, 1.0)
backward_mini_batch(engine, examples, cfg.algorithm, 1.0)  # lr 0: the same gradients again
if int(sys.argv[2]) == 0:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
else:
    from deepspeed.utils import safe_get_full_grad
    grads = [safe_get_full_grad(p) for p in engine.module.parameters()]
print(json.dumps({"reported": stats["grad_norm"], "expected": float(torch.nn.utils.get_total_norm(grads))}))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_update_reports_the_gradient_norm(tiny_model_dir, zero_stage):
    """DeepSpeed's plain fp32 path (ZeRO-0, the main job's) clips without keeping the norm;
    the update must still log the norm it clipped."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _GRAD_NORM_SCRIPT, str(tiny_model_dir), str(zero_stage)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms = json.loads(proc.stdout.strip().splitlines()[-1])
    assert norms["reported"] > 0
    assert norms["reported"] == pytest.approx(norms["expected"], rel=1e-4)
