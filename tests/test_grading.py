"""Math grading (extraction, math-verify) and the bounded worker pool, on the real data."""
from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from at_core.data import PAPER_BENCHMARKS, load_benchmark
from at_reward.grade import Grade
from at_reward.math import extract_answer, extract_boxed, gold_alternatives, grade, quick_match
from at_reward.pool import GradingError, GradingPool

TIMEOUT_S = 2.0  # the pool's per-item limit in these tests (the default is 5 s)


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=2, timeout_s=TIMEOUT_S) as p:
        yield p


def boxed(answer: str) -> str:
    return "<think>\nwork\n</think>\n\n\\boxed{" + answer + "}"


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, answer",
    [
        ("</think>\n\nSo \\boxed{42}.", "42"),
        ("</think> \\boxed{\\frac{1}{2}} and then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # last box
        ("</think> $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # escaped braces are not grouping
        ("</think> $\\boxed 5$", "5"),
        ("</think> the answer is \\boxed 7.\nDone", "7"),
        ("</think> \\fbox{x+1}", "x+1"),
        ("</think> \\boxed {3}", "3"),
        ("</think> \\boxed{\\boxed{9}}", "9"),
        ("<think>\\boxed{1}</think> \\boxed{2} </think> final \\boxed{3}", "3"),  # after the LAST </think>
        ("</think> \\boxed{}", ""),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize(
    "response",
    [
        "<think> reasoning \\boxed{4} with no end",  # no </think>
        "<think>\\boxed{4}</think> the answer is 4",  # no box after the last </think>
        "</think> \\boxed{4",  # unterminated box
        "</think> \\boxedx{4}",  # not a box command
    ],
)
def test_format_errors(response):
    assert extract_answer(response) is None
    assert grade(response, "4") == Grade(correct=False, format_ok=False, answer=None)


def test_extract_boxed_without_box():
    assert extract_boxed("no box here") is None


def test_gold_types():
    assert gold_alternatives(142.0) == ("142",)
    assert gold_alternatives(7) == ("7",)
    assert gold_alternatives(0.25) == ("0.25",)
    assert gold_alternatives(1e-05) == ("0.00001",)
    assert gold_alternatives(["9.6\n", "9.60"]) == ("9.6", "9.60")
    for bad in (None, True, [], "  ", {"a": 1}, float("nan")):
        with pytest.raises((TypeError, ValueError)):
            gold_alternatives(bad)


def test_grade_gold_types_and_equivalent_forms():
    assert grade(boxed("142"), 142.0).correct  # AMC's float golds
    assert grade(boxed("25"), "025").correct  # AIME's zero-padded golds
    assert grade(boxed("\\dfrac{1}{2}"), "0.5").correct
    assert grade(boxed("(3, \\pi/2)"), "\\left( 3, \\frac{\\pi}{2} \\right)").correct
    assert grade(boxed("8.7 \\times 10^{8}"), ["870000000", "8.7 \\times 10^{8}"]).correct  # any alternative
    assert not grade(boxed("8.7 \\times 10^{9}"), ["8.7 \\times 10^{8}"]).correct
    assert not grade(boxed("143"), 142.0).correct
    g = grade(boxed("\\frac{3}{4}"), "\\frac34")
    assert g == Grade(correct=True, format_ok=True, answer="\\frac{3}{4}")


def test_quick_match_decides_only_what_math_verify_would():
    assert quick_match("25", ("025",)) is True
    assert quick_match("$12$", ("12",)) is True
    assert quick_match("\\frac{14}{2}", ("7",)) is True  # integers and integer fractions: exact
    assert quick_match("-\\dfrac{1}{2}", ("-1/2",)) is True
    assert quick_match("7/3", ("\\frac{7}{2}",)) is False
    assert quick_match("3", ("4",)) is False
    assert quick_match("3", ("4", "x")) is None  # a non-numeric alternative: math-verify decides
    assert quick_match("0.333333", ("\\frac{1}{3}",)) is None  # math-verify rounds floats: its call
    assert quick_match("1/0", ("1",)) is None
    assert quick_match("1+" * 1500, ("7",)) is False  # past MAX_ANSWER_CHARS only exact text counts
    assert quick_match("9" * 10000, ("7",)) is False  # (and no 10,000-digit int() is attempted)


# ----------------------------------------------------------------------------- acceptance


def _golds():
    for name in PAPER_BENCHMARKS:
        for p in load_benchmark(name):
            yield name, p


@pytest.mark.timeout(120)
def test_every_gold_grades_correct(pool):
    """Each gold of the five benchmarks, written as the model would, grades correct.

    Observed: all 1560 pass (also with math-verify alone, skipping the exact-match
    shortcut). No known exceptions; the bar is the 99.5% asked for.
    """
    items = list(_golds())
    pairs = [("</think>\n\n\\boxed{" + gold_alternatives(p.answer)[0] + "}", p.answer) for _, p in items]
    grades = pool.grade_batch(pairs)
    failures = [(name, p.index, p.answer) for (name, p), g in zip(items, grades) if not g.correct]
    assert len(items) == 1560
    assert len(failures) / len(items) <= 0.005, failures


@pytest.mark.timeout(180)
def test_other_problems_golds_grade_wrong(pool):
    """The gold of the next problem of the same benchmark, where the texts differ, grades
    wrong. math-verify is slow on symbolic answers (Minerva: ~0.1 s median, up to 3 s), so
    by default an even spread of about 60 problems per benchmark (25 of Minerva) is
    checked; AT_FULL_GRADING=1 checks all 1549 pairs.

    Known exception (full run: 1 of 1549): MATH500 row 22, gold "5" against the next
    row's gold "x=5": math-verify reads an assignment `x=5` as its value, so they agree.
    """
    full = os.environ.get("AT_FULL_GRADING") == "1"
    pairs, where = [], []
    for name in PAPER_BENCHMARKS:
        problems = load_benchmark(name)
        step = 1 if full else max(1, len(problems) // (25 if name == "minerva" else 60))
        for i in range(0, len(problems), step):
            wrong = gold_alternatives(problems[(i + 1) % len(problems)].answer)[0]
            if wrong in gold_alternatives(problems[i].answer):
                continue
            pairs.append(("</think>\n\n\\boxed{" + wrong + "}", problems[i].answer))
            where.append((name, i, wrong))
    grades = pool.grade_batch(pairs)
    accepted = [w for w, g in zip(where, grades) if g.correct]
    assert len(pairs) >= (1500 if full else 250)
    assert len(accepted) / len(pairs) <= 0.01, accepted


# ----------------------------------------------------------------------------- bounds


PATHOLOGICAL = {
    "tower": "9^{9^{9^{9}}}",
    "tower_minus_one": "2^{3^{4^{5}}} - 1",
    "long": "1+" * 25000,
    "deep_frac": "\\frac{" * 60 + "1" + "}{2}" * 60,
    "unbalanced": "\\frac{1}{2}}}}{{{",
    "binary": bytes(range(256)).decode("latin-1") * 4,
    "nested_sqrt": "\\sqrt{" * 100 + "2" + "}" * 100,
}


@pytest.mark.timeout(60)
def test_pathological_answers_return_incorrect_within_the_limit(pool):
    names = list(PATHOLOGICAL)
    pairs = [(boxed(PATHOLOGICAL[n]), "7") for n in names] + [(boxed("7"), "7"), (boxed("\\frac{14}{2}"), "7")]
    t0 = time.monotonic()
    grades = pool.grade_batch(pairs)
    elapsed = time.monotonic() - t0
    assert [g.correct for g in grades] == [False] * len(names) + [True, True], dict(zip(names, grades))
    # Each item is bounded by TIMEOUT_S; two workers share them.
    assert max(pool.last_latency_s) < TIMEOUT_S + 1.0, pool.last_latency_s
    assert elapsed < TIMEOUT_S * (len(pairs) / 2 + 1) + 2.0
    # And the pool is still healthy afterwards.
    assert pool.grade_batch([(boxed("\\frac{1}{3}"), "1/3")])[0].correct


# Graders that misbehave, run in the pool's workers (they must be module-level).


def misbehaving_grader(response: str, gold) -> Grade:
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        ctypes.string_at(0)
    if response == "hang":
        time.sleep(600)
    if response == "spin":
        while True:
            pass
    if response == "base_exception":
        raise KeyboardInterrupt  # a BaseException, like math-verify's TimeoutException
    return Grade(correct=response == gold, format_ok=True, answer=response)


@pytest.mark.timeout(60)
def test_dead_and_hung_workers_are_replaced():
    with GradingPool(workers=2, timeout_s=1.0, grader=misbehaving_grader) as p:
        bad = ["exit", "segfault", "hang", "spin", "base_exception"]
        pairs = []
        for b in bad:
            pairs += [(b, b), ("ok", "ok")]
        t0 = time.monotonic()
        grades = p.grade_batch(pairs)
        assert time.monotonic() - t0 < 10
        assert [g.correct for g in grades] == [False, True] * len(bad)
        assert p.stats["crashes"] == 2 and p.stats["timeouts"] == 2 and p.stats["errors"] == 1, p.stats
        # A worker killed from outside between batches is noticed and replaced.
        victim = p.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        assert [g.correct for g in p.grade_batch([("a", "a"), ("b", "b"), ("c", "x")])] == [True, True, False]
        assert victim not in p.worker_pids() and len(p.worker_pids()) == 2
    with pytest.raises(GradingError):
        p.grade_batch([("a", "a")])


def slow_grader(response: str, gold) -> Grade:
    time.sleep(float(response.split()[1]) if response.startswith("sleep") else 0.0)
    return Grade(correct=response == gold or response.startswith("sleep"), format_ok=True, answer=response)


@pytest.mark.timeout(60)
def test_interrupted_batch_leaves_no_stale_answers():
    """A batch interrupted in the caller (here by an alarm, as Ctrl-C would) must not let
    its late answers be read as the next batch's: the busy workers are replaced."""

    class Interrupted(Exception):
        pass

    def on_alarm(signum, frame):
        raise Interrupted

    with GradingPool(workers=2, timeout_s=10.0, grader=slow_grader) as p:
        old = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(Interrupted):
                p.grade_batch([("sleep 2", "x")] * 4)  # every answer here would be "correct"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        time.sleep(2.0)  # the old workers would have answered by now
        assert [g.correct for g in p.grade_batch([("a", "b"), ("c", "d"), ("e", "e")])] == [False, False, True]


def test_unimportable_grader_is_an_error_not_a_silent_zero():
    def local_grader(response, gold):  # not importable by name in a worker
        return True

    with pytest.raises(GradingError, match="module-level"):
        GradingPool(workers=1, grader=local_grader)


@pytest.mark.timeout(60)
def test_close_stops_every_process():
    p = GradingPool(workers=2, timeout_s=2.0)
    assert p.grade_batch([(boxed("\\frac{2}{4}"), "1/2")])[0].correct
    pids = p.worker_pids() + [p.zygote_pid()]
    p.close()
    p.close()  # idempotent
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.05)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_items_of_one_gold_go_to_one_worker():
    """The pool's work queue hands a worker the items of golds it already parsed."""
    from at_reward.pool import _Todo

    keys = ["g0"] * 4 + ["g1"] * 4 + ["g2"] * 2
    todo = _Todo(len(keys), keys)
    taken = {0: [], 1: []}
    slot = 0
    while todo:
        taken[slot].append(todo.take(slot))
        slot = 1 - slot  # the two workers ask in turn
    assert sorted(taken[0] + taken[1]) == list(range(10))
    owners = {k: {s for s in taken for i in taken[s] if keys[i] == k} for k in set(keys)}
    # g0 and g1 each stay with one worker; the last key is shared once both run dry.
    assert owners["g0"] == {0} and owners["g1"] == {1}
    # Requeued items (a worker killed mid-queue) come back first, in order.
    todo = _Todo(3, ["a", "a", "b"])
    first = todo.take(0)
    todo.put_back(first)
    assert [todo.take(0), todo.take(0), todo.take(0)] == [0, 1, 2]
