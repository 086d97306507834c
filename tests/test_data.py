"""Data loaders: JSON / JSONL / parquet, answer extraction, row validation, shipped sets."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from at_core.data import (
    BENCHMARKS,
    TRAIN_SETS,
    DataError,
    Problem,
    data_dir,
    load_benchmark,
    load_problems,
    load_train_set,
    read_rows,
)

ROWS = [
    {"problem": "1+1?", "answer": "2", "level": 1},
    {"problem": "Half of 3?", "answer": 1.5, "level": 2.0},
    {"problem": "Roots of x^2=1?", "answer": ["1, -1", "\\pm 1"]},
    {"problem": "7*6?", "answer": 42, "level": "hard"},
]


def write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is fine
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "answer": json.dumps(r["answer"])} for r in rows]), path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_load_json_and_jsonl(tmp_path, kind):
    path = write(tmp_path / f"d.{kind}", ROWS, kind)
    problems = load_problems(path, tier_key="level")
    assert problems[0] == Problem("1+1?", "2", tier="1", source=str(path), index=0)
    assert [p.answer for p in problems] == ["2", 1.5, ["1, -1", "\\pm 1"], 42]
    assert [p.tier for p in problems] == ["1", "2", None, "hard"]  # 2.0 -> "2"; missing -> None
    assert [p.index for p in problems] == [0, 1, 2, 3]


def test_load_parquet(tmp_path):
    rows = [{"question": "2+2?", "final": "4"}, {"question": "3+3?", "final": "6"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems = load_problems(path, problem_key="question", answer_key="final")
    assert [(p.problem, p.answer, p.index) for p in problems] == [("2+2?", "4", 0), ("3+3?", "6", 1)]


def test_answer_extraction(tmp_path):
    rows = [{"q": "a", "solution": "3 + 4 = 7\n#### 7"}, {"q": "b", "solution": "so 1,000\n####  1,000 "}]
    path = write(tmp_path / "g.jsonl", rows, "jsonl")
    assert [p.answer for p in load_problems(path, "q", "solution", "after_hashes")] == ["7", "1,000"]
    # A regex: its first group, last match wins.
    rows = [{"q": "a", "sol": "first ANSWER: 3 then ANSWER: 5."}]
    path = write(tmp_path / "r.json", rows, "json")
    assert load_problems(path, "q", "sol", r"ANSWER:\s*(\d+)")[0].answer == "5"
    with pytest.raises(DataError, match=r"r\.json: row 0: answer_extract=.*found no answer"):
        load_problems(path, "q", "sol", r"FINAL=(\d+)")
    with pytest.raises(DataError, match="neither one of"):
        load_problems(path, "q", "sol", "(unclosed")


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"answer": "2"}, "missing field 'problem'"),
        ({"problem": "x"}, "missing field 'answer'"),
        ({"problem": "   ", "answer": "2"}, "field 'problem' is empty"),
        ({"problem": 5, "answer": "2"}, "field 'problem' must be a string, got int"),
        ({"problem": "x", "answer": None}, "field 'answer' is null"),
        ({"problem": "x", "answer": ""}, "field 'answer' is empty"),
        ({"problem": "x", "answer": []}, "field 'answer' is an empty list"),
        ({"problem": "x", "answer": True}, "field 'answer' has type bool"),
        ({"problem": "x", "answer": {"v": 1}}, "field 'answer' has type dict"),
        ("just a string", "expected an object"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, bad_row, message):
    rows = [ROWS[0], ROWS[1], bad_row]
    for kind in ("json", "jsonl"):
        path = write(tmp_path / f"bad.{kind}", rows, kind)
        with pytest.raises(DataError) as err:
            load_problems(path)
        where = "row 2: " if kind == "json" else "row 2 (line 3): "
        assert str(err.value).startswith(f"{path}: {where}{message}")


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "missing.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1 \(line 3\): invalid JSON"):
        load_problems(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"problem": "a"}')
    with pytest.raises(DataError, match="must hold a list"):
        load_problems(obj)
    csv = tmp_path / "d.csv"
    csv.write_text("problem,answer\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_problems(csv)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        load_problems(empty)


def test_shipped_benchmarks_and_train_sets():
    sizes = {"math500": 500, "aime24": 30, "amc": 83, "minerva": 272, "olympiadbench": 675, "gsm8k": 1319}
    assert set(BENCHMARKS) == set(sizes)
    for name, n in sizes.items():
        problems = load_benchmark(name)
        assert len(problems) == n and all(p.problem.strip() for p in problems)
    assert {p.tier for p in load_benchmark("math500")} == {"1", "2", "3", "4", "5"}
    gsm = load_benchmark("gsm8k")
    assert gsm[0].answer == "18"  # Janet's ducks: "#### 18"
    assert all(isinstance(p.answer, str) and "####" not in p.answer for p in gsm)
    assert {name: len(load_train_set(name)) for name in TRAIN_SETS} == {"math": 7474, "aime": 975}


def test_data_dir_override(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    write(tmp_path / "benchmarks" / "aime24.json", ROWS[:2], "json")
    assert len(load_benchmark("aime24", root=tmp_path)) == 2
    monkeypatch.setenv("AUTOTHINK_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path and len(load_benchmark("aime24")) == 2
    with pytest.raises(DataError, match="unknown benchmark 'aime25'; known: math500, aime24, amc"):
        load_benchmark("aime25")
    with pytest.raises(DataError, match="unknown training set 'maths'; known: math, aime"):
        load_train_set("maths")


def test_read_rows_keeps_every_field(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS, "jsonl")
    assert read_rows(path) == ROWS
    rows = read_rows(data_dir() / BENCHMARKS["math500"].path)
    assert len(rows) == 500 and {"difficulty", "unique_id"} <= set(rows[0])
