"""The evaluation runner end to end: the real CLI, the project's rollout server on loopback,
the real grading pool, a random tiny model on the shipped MATH500 rows.

What is checked: every (problem, sample) lands in generations.jsonl with its row fields;
`--group-by difficulty` matches a recount from that file; an interrupted run (SIGINT, then a
torn line and a half-finished request) resumed with `--resume` ends with the same samples
as an uninterrupted run; other settings or an existing file are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from at_core.data import BENCHMARKS, data_dir, read_rows
from at_core.eval import main
from at_core.generations import read_records

ROOT = Path(__file__).resolve().parents[1]
MATH500 = read_rows(data_dir() / BENCHMARKS["math500"].path)
FIELDS = {"source", "problem_index", "sample", "prompt", "response", "tokens", "finish_reason", "mode", "answer",
          "correct", "gold", "row"}


def args(model, out, *extra, limit=8, samples=2, tokens=16, batch=2):
    return ["--model", str(model), "--benchmarks", "math500", "--limit", str(limit), "--samples", str(samples),
            "--max-new-tokens", str(tokens), "--batch-prompts", str(batch), "--workers", "1", "--out", str(out),
            *extra]


def by_key(records):
    return {(r["source"], r["problem_index"], r["sample"]): r for r in records}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted evaluation: 8 MATH500 problems x 2 samples, 2 problems a request."""
    out = tmp_path_factory.mktemp("eval_full")
    assert main(args(tiny_model_dir, out, "--group-by", "difficulty")) == 0
    return out


@pytest.mark.timeout(120)
def test_every_sample_is_written_with_its_row(full_run, tiny_model_dir):
    records = read_records(full_run / "generations.jsonl")
    assert set(by_key(records)) == {("math500", i, j) for i in range(8) for j in range(2)}
    for r in records:
        assert set(r) == FIELDS
        row = MATH500[r["problem_index"]]
        assert r["row"] == {"difficulty": row["difficulty"], "unique_id": row["unique_id"]}
        assert r["gold"] == row["answer"] and row["problem"] in r["prompt"] and r["prompt"].endswith("<think>\n...\n")
        assert 1 <= r["tokens"] <= 16 and r["finish_reason"] in ("stop", "length")
        assert r["mode"] == ("no_think" if r["response"].startswith("</think>") else "think")
        assert r["correct"] is False or r["answer"] is not None
    settings = json.loads((full_run / "generations.settings.json").read_text())
    assert settings["samples"] == 2 and settings["problems"] == 8 and settings["model"] == str(Path(tiny_model_dir).resolve())


@pytest.mark.timeout(120)
def test_group_by_difficulty_recounts_from_the_file(full_run):
    records = read_records(full_run / "generations.jsonl")
    per_level = defaultdict(list)
    for r in records:
        per_level[str(int(r["row"]["difficulty"]))].append(r)
    result = json.loads((full_run / "results.json").read_text())
    groups = result["groups"]["difficulty"]
    assert list(groups) == sorted(per_level, key=float)
    for level, rs in per_level.items():
        g = groups[level]
        assert g["problems"] == len({r["problem_index"] for r in rs}) and g["samples"] == len(rs)
        assert g["think_rate"] == pytest.approx(sum(r["mode"] == "think" for r in rs) / len(rs))
        assert g["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in rs) / len(rs))  # 2 samples each
        assert g["accuracy"] == pytest.approx(sum(r["correct"] for r in rs) / len(rs))
    overall = result["rows"][0]
    assert overall["benchmarks"]["math500"]["problems"] == 8
    assert overall["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in records) / len(records))
    md = (full_run / "results.md").read_text()
    assert "By `difficulty`:" in md and "| difficulty | problems | think rate |" in md
    png = (full_run / "think_rate_by_difficulty.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.timeout(240)
def test_resume_after_an_interrupt_gives_the_uninterrupted_samples(full_run, tiny_model_dir, tmp_path):
    out = tmp_path / "cut"
    cmd = args(tiny_model_dir, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "at_core.eval", *cmd], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gens = out / "generations.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if gens.exists() and gens.read_text().count("\n") >= 4:  # the first request is in
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "continue with the same command and --resume" in err and "Traceback" not in err
    lines = gens.read_text().splitlines(keepends=True)
    assert 4 <= len(lines) < 16  # interrupted before the end; every line whole
    # As if killed mid-write inside a request: keep 1.5 lines of the last request written.
    full = 4 * ((len(lines) - 1) // 4)
    kept = full + 1 if full + 1 < len(lines) else full - 3
    gens.write_text("".join(lines[:kept]) + lines[kept][: len(lines[kept]) // 2])

    assert main(cmd + ["--resume", "--group-by", "difficulty"]) == 0
    got, want = read_records(gens), read_records(full_run / "generations.jsonl")
    assert len(got) == len(want) == 16
    assert by_key(got) == by_key(want)
    assert gens.read_text().endswith("}\n")  # the torn line was replaced, not appended to
    res = [json.loads((d / "results.json").read_text()) for d in (out, full_run)]
    assert res[0]["rows"] == res[1]["rows"] and res[0]["groups"] == res[1]["groups"]


@pytest.mark.timeout(120)
def test_resume_refuses_other_settings_and_a_file_in_the_way(full_run, tiny_model_dir, tmp_path, capsys):
    full_run = Path(shutil.copytree(full_run, tmp_path / "copy"))  # the module's run stays as it was
    before = (full_run / "generations.jsonl").read_text()
    assert main(args(tiny_model_dir, full_run, "--resume", "--temperature", "1.0", )) == 2
    assert "other settings: temperature 0.6 (file) vs 1.0 (now)" in capsys.readouterr().err
    assert main(args(tiny_model_dir, full_run, )) == 2
    assert "generations.jsonl exists: pass --resume" in capsys.readouterr().err
    assert main(args(tiny_model_dir, full_run, "--group-by", "level", )) == 2
    assert "--group-by level: no problem's row has that field (fields: difficulty, unique_id)" in \
        capsys.readouterr().err
    assert (full_run / "generations.jsonl").read_text() == before
    # A finished evaluation resumes to its report alone, with a new grouping, starting no server.
    t0 = time.perf_counter()
    assert main(args(tiny_model_dir, full_run, "--resume", "--group-by", "unique_id", )) == 0
    assert time.perf_counter() - t0 < 10 and (full_run / "generations.jsonl").read_text() == before
    groups = json.loads((full_run / "results.json").read_text())["groups"]["unique_id"]
    assert set(groups) == {MATH500[i]["unique_id"] for i in range(8)}
    assert (full_run / "think_rate_by_unique_id.png").is_file()


def test_group_order_and_labels_and_a_torn_middle_line(tmp_path):
    from at_core.eval_report import group_label, group_order
    from at_core.generations import ResumeError

    assert [group_label(v) for v in (2.0, 2, 4.5, "hard", None, True)] == ["2", "2", "4.5", "hard", "-", "true"]
    assert group_order(["10", "-", "2", "hard", "easy", "1.5", "b"]) == ["1.5", "2", "10", "easy", "hard", "b", "-"]
    path = tmp_path / "generations.jsonl"
    path.write_text('{"source": "a", "problem_index": 0, "sample": 0}\n{"sour\n{"source": "a"}\n')
    with pytest.raises(ResumeError, match=r"generations\.jsonl: line 2: invalid JSON"):
        read_records(path)
    path.write_text('{"source": "a", "problem_index": 0, "sample": 0}\n{"sour')
    assert read_records(path) == [{"source": "a", "problem_index": 0, "sample": 0}]
