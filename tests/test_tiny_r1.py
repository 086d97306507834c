"""The main job's pipeline at --quick size: every phase runs and every promised file appears."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

ROWS = ["base/standard", "base/no_think", "base/ellipsis", "stage1", "stage2", "stage3"]
ABLATION_ROWS = ["no_stage1/stage3", "no_length_shaping/stage3", "plain_reward/stage3"]


@pytest.mark.timeout(900)
def test_quick_run_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "examples/tiny_r1.py", "--quick", "--ablations", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for phase in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {phase}" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ROWS + ABLATION_ROWS
    assert results["threads"] == 1
    for row in results["rows"]:
        for key in ("accuracy", "mean_tokens", "think_rate"):
            assert isinstance(row[key], float)
        assert set(row["tiers"]) == {"easy", "medium", "hard"}
        assert 0.0 <= row["accuracy"] <= 1.0 and row["mean_tokens"] > 0
    assert results["wall_seconds"] > 0
    by_name = {r["name"]: r for r in results["rows"]}
    assert by_name["base/standard"]["think_rate"] == 1.0 or by_name["base/standard"]["think_rate"] > 0.9
    assert by_name["base/no_think"]["think_rate"] == 0.0  # the forced prompt closed the block
    md = (out / "results.md").read_text()
    assert all(name in md for name in ROWS) and "stage3 vs base/standard" in md
    for f in ("tradeoff.png", "think_rate.png", "metrics.jsonl", "config.yaml"):
        assert (out / f).stat().st_size > 0, f
    assert list((out / "tensorboard").iterdir())
    steps = [json.loads(line)["global_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    # each ablation is its own run from the same base, with the stages and shaping it names
    ablations = out / "ablations"
    stages = {name: sorted({json.loads(line)["stage"] for line in (ablations / name / "metrics.jsonl").open()})
              for name in ("no_stage1", "no_length_shaping", "plain_reward")}
    assert stages == {"no_stage1": ["2", "3"], "no_length_shaping": ["1", "2", "3"], "plain_reward": ["1", "2", "3"]}
    saved = (ablations / "plain_reward" / "config.yaml").read_text()
    assert "balance_target: null" in saved and "length_alpha: 0" in saved

    # --resume auto on a finished run redoes nothing and reproduces the same table
    again = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.timeout(600)
def test_sweep_runs_each_seed_and_thread_count_and_summarises(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "examples/tiny_sweep.py", "--quick", "--seeds", "0", "1", "--threads", "1",
           "--parallel", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                          timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["threads"]) for r in sweep["runs"]] == [(0, 1), (1, 1)]
    assert all(r["threads"] == 1 and len(r["targets"]) == 11 for r in sweep["runs"])
    acc = [100 * next(x for x in r["rows"] if x["name"] == "stage3")["accuracy"] for r in sweep["runs"]]
    s3 = sweep["summary"]["stage3"]["accuracy"]
    assert s3["min"] == min(acc) and s3["max"] == max(acc) and s3["mean"] == pytest.approx(sum(acc) / 2)
    md = (out / "sweep.md").read_text()
    assert "| stage3 |" in md and "stage1_alive_medium" in md
    # the two seeds built different bases
    bases = [json.loads((out / f"seed{s}_t1" / "base" / "tiny_world.json").read_text())["recipe"]["seed"] for s in (0, 1)]
    assert bases == [0, 1]
