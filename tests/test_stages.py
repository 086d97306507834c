"""The reference's per-stage behaviour as settings: fresh optimizer and data order per stage,
long prompts dropped, the reference reward rules, its loss form and group-of-one rule, end to end."""
import json
import os
import subprocess
import sys

import pytest

from at_core.data import Problem, load_problems
from at_core.recorder import read_metrics
from at_core.stream import PromptStream
from at_core.trainer import batch_digest
from helpers import ROOT


def test_start_epoch_skips_to_a_fresh_permutation():
    problems = [Problem(problem=str(i), answer=str(i)) for i in range(5)]
    stream = PromptStream(problems, seed=3)
    stream.start_epoch()
    assert stream.position == 0  # at an epoch's start: nothing to skip
    first = stream.take(2)
    stream.start_epoch()
    assert stream.position == 5
    nxt = stream.take(5)
    assert sorted(p.problem for p in nxt) == [str(i) for i in range(5)]  # a whole new epoch
    again = PromptStream(problems, seed=3, position=5).take(5)
    assert nxt == again and first == PromptStream(problems, seed=3).take(2)


REFERENCE = ["reward.rules=reference", "algorithm.loss_agg=micro_batch_token_mean", "algorithm.group_of_one=reward",
             "algorithm.weight_decay=0.01", "data.long_prompts=drop", "stage.3.reset_optimizer=true",
             "stage.3.reshuffle=true"]


@pytest.mark.timeout(600)
def test_reference_settings_end_to_end(tiny_model_dir, tmp_path):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
    rows.append({"problem": "What is " + " + ".join(["1"] * 300) + "?", "answer": "300"})  # > 64 prompt tokens
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    args = ["--model-path", str(tiny_model_dir), "--out", str(out), f"data.train_files=[{data}]", "data.tier_key=null",
            "max_prompt_len=64", "stage.1.steps=1", "stage.2.steps=0", "stage.3.steps=1", "rollout.retries=1",
            *[f"stage.{s}.{k}" for s in (1, 3) for k in ("prompts_per_step=4", "rollouts_per_prompt=2",
                                                         "max_response_len=12")], *REFERENCE]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "dropped 1 of 10 training problems" in proc.stderr
    m = read_metrics(out)
    assert [(r["stage"], r["step"]) for r in m] == [("1", 1), ("3", 1)]
    kept = [p for p in load_problems(data, tier_key=None) if len(p.problem) < 100]
    stream = PromptStream(kept, seed=0)
    assert m[0]["batch_digest"] == batch_digest(stream.take(4))
    stream.start_epoch()  # stage 3 starts a fresh permutation (9 problems: position 4 -> 9)
    assert m[1]["batch_digest"] == batch_digest(stream.take(4))


@pytest.mark.timeout(600)
def test_in_training_evaluation_every_n_steps(tiny_model_dir, tmp_path):
    """eval.every=2 on data.eval_files: eval/... keys in metrics.jsonl at steps 2 and 4 only,
    per benchmark file, and in TensorBoard."""
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(2) for b in range(3)]
    evalset = tmp_path / "held_out.json"
    evalset.write_text(json.dumps(rows))
    out = tmp_path / "run"
    args = ["--model-path", str(tiny_model_dir), "--out", str(out), "data.tiny_train_size=40", "stage.1.steps=3",
            "stage.2.steps=0", "stage.3.steps=1", "rollout.retries=1", "eval.every=2", "eval.samples=2",
            "eval.max_response_len=8", f"data.eval_files=[{evalset}]",
            *[f"stage.{s}.{k}" for s in (1, 3) for k in ("prompts_per_step=2", "rollouts_per_prompt=2",
                                                         "max_response_len=8")]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = read_metrics(out)
    assert [r["global_step"] for r in m if "eval/accuracy" in r] == [2, 4]
    for r in m:
        if "eval/accuracy" in r:
            assert 0.0 <= r["eval/accuracy"] <= 1.0 and 0.0 <= r["eval/think_rate"] <= 1.0
            assert r["eval/mean_tokens"] > 0 and "eval/accuracy/held_out" in r
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/accuracy")] == [2, 4]


def test_eval_every_without_eval_files_for_a_real_model_names_the_key(tiny_model_dir, tmp_path):
    import shutil

    real = tmp_path / "not_tiny"
    shutil.copytree(tiny_model_dir, real)
    conf = json.loads((real / "config.json").read_text())
    conf.pop("tiny_world")
    (real / "config.json").write_text(json.dumps(conf))
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"problem": "1 + 1?", "answer": "2"}]))
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(real), "--out",
                           str(tmp_path / "run"), f"data.train_files=[{train}]", "eval.every=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.eval_files" in proc.stderr and "Traceback" not in proc.stderr
