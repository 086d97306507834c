"""The tiny R1-style world: task generator, teacher traces, SFT base (quick build)."""
import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from at_core.prompts import STYLE_SUFFIX, render_prompt
from at_core.tiny import teacher
from at_core.tiny.sft import MARKER, build_base, evaluate_base
from at_core.tiny.task import TIERS, generate, generate_all, parse, split_key, split_of, tier_of
from at_reward.autothink import detect_mode
from at_reward.math import grade

EQUATION = re.compile(r"(?<![\d*+-])(\d+)([*+-])(\d+)=(\d+)")
COUNTING = re.compile(r"counting up from (\d+): ([\d, ]+)\.")


def test_generator_is_reproducible_and_seeded():
    for tier in TIERS:
        a, b = generate(tier, 200, seed=3), generate(tier, 200, seed=3)
        assert a == b
        assert [p.problem for p in generate(tier, 200, seed=4)] != [p.problem for p in a]


def test_splits_never_overlap():
    for tier in TIERS:
        train = generate(tier, 4000, seed=0, split="train")
        test = generate(tier, 400, seed=0, split="test")
        assert len({p.problem for p in test}) == len(test)  # held-out problems are distinct
        assert all(split_of(p.problem) == "train" for p in train)
        assert all(split_of(p.problem) == "test" for p in test)
        assert not {split_key(p.problem) for p in train} & {split_key(p.problem) for p in test}
        assert not {p.problem for p in train} & {p.problem for p in test}
    # a held-out hard product is unseen in training under every wording
    hard_train = {frozenset((parse(p.problem).a, parse(p.problem).b)) for p in generate("hard", 4000, 1)}
    for p in generate("hard", 400, 1, split="test"):
        assert frozenset((parse(p.problem).a, parse(p.problem).b)) not in hard_train


def test_tiers_are_distinct_and_readable_from_text():
    for tier in TIERS:
        problems = generate(tier, 500, seed=1)
        assert all(tier_of(p.problem) == tier == p.tier for p in problems)
        assert all(parse(p.problem).value == p.answer and isinstance(p.answer, int) for p in problems)
        ops = {parse(p.problem).op for p in problems}
        digits = {len(str(parse(p.problem).a)) for p in problems if parse(p.problem).op != "-"}
        if tier == "easy":
            assert ops == {"+", "-"} and digits == {1}
        elif tier == "medium":
            assert ops == {"*"} and digits == {1}
        else:
            assert ops == {"*"} and digits == {2}
            assert all(parse(p.problem).a % 10 and parse(p.problem).b % 10 for p in problems)
        assert len({p.problem.split(" ")[0] for p in problems}) >= 3  # several wordings
    interleaved = generate_all(5, seed=0)
    assert [p.tier for p in interleaved[:3]] == list(TIERS)


def _check_trace(problem):
    """Re-derive every step of the teacher's trace; returns the number of steps checked."""
    trace = teacher.think_trace(problem)
    arith = parse(problem.problem)
    steps = 0
    body = trace.splitlines()[:-1]  # the last line restates the result
    for x, op, y, z in EQUATION.findall("\n".join(body)):
        x, y, z = int(x), int(y), int(z)
        assert {"+": x + y, "-": x - y, "*": x * y}[op] == z, (problem.problem, trace)
        assert op != "*" or (x < 10 and y < 10), trace  # products are single-digit facts
        steps += 1
    for start, numbers in COUNTING.findall(trace):
        seq = [int(n) for n in numbers.split(", ")]
        assert seq == list(range(int(start) + 1, int(start) + 1 + len(seq))), trace
        assert seq[-1] == max(arith.a, arith.value)
        steps += len(seq)
    assert trace.splitlines()[-1] == f"So {arith.a}{arith.op}{arith.b}={arith.value}."
    if arith.tier == "hard":  # the answer is assembled from the columns' lines
        lines = trace.splitlines()[1:-1]
        units, tens, lead = (int(lines[i].split("=")[1]) for i in (0, 4, 6))
        assert int(f"{lead}{tens % 10}{units % 10}") == arith.value
        assert lines[4].split("+")[1].split("=")[0] == str(units // 10)
        assert lines[6].split("+")[1].split("=")[0] == str(tens // 10)
    return steps


def test_teacher_traces_are_correct_step_by_step():
    for tier in TIERS:
        for p in generate(tier, 400, seed=7) + generate(tier, 100, seed=7, split="test"):
            assert _check_trace(p) >= 3


def test_teacher_responses_grade_correct_in_every_mode():
    for p in generate_all(150, seed=2):
        think = teacher.think_response(p)
        assert think.endswith(f"\n</think>\n\n\\boxed{{{p.answer}}}") and think.count("</think>") == 1
        assert detect_mode(think) == "think" and grade(think, p.answer).correct
        no_think = teacher.no_think_response(p)
        assert detect_mode(no_think) == "no_think" and grade(no_think, p.answer).correct
        assert grade(STYLE_SUFFIX["no_think"] + teacher.forced_no_think_response(p), p.answer).correct
        assert not grade(no_think, p.answer + 1).correct


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("tiny_base"), quick=True, progress=False)


@pytest.mark.timeout(240)
def test_quick_sft_builds_a_loadable_model_and_learns(quick_base):
    record = json.loads((quick_base / MARKER).read_text())
    assert record["loss_last"] < 0.75 * record["loss_first"]
    model = AutoModelForCausalLM.from_pretrained(quick_base)
    tok = AutoTokenizer.from_pretrained(quick_base)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert (quick_base / "generation_config.json").exists()
    # the same recipe is reused, not rebuilt
    before = (quick_base / "model.safetensors").stat().st_mtime_ns
    assert build_base(quick_base, quick=True, progress=False) == quick_base
    assert (quick_base / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.timeout(120)
def test_evaluate_base_reports_every_tier(quick_base):
    r = evaluate_base(quick_base, n_per_tier=4, style="ellipsis", temperature=0.6, max_new_tokens=12)
    for tier in TIERS:
        assert 0 <= r[tier]["accuracy"] <= 1 and 0 <= r[tier]["think_rate"] <= 1
        assert 1 <= r[tier]["mean_tokens"] <= 12


def test_every_teacher_text_round_trips_through_autotokenizer(quick_base):
    tok = AutoTokenizer.from_pretrained(quick_base)
    end_think = tok.convert_tokens_to_ids("</think>")
    for p in generate_all(100, seed=5) + generate_all(30, seed=5, split="test"):
        for style in STYLE_SUFFIX:
            prompt = render_prompt(tok, p.problem, style)
            assert tok.decode(tok(prompt, add_special_tokens=False)["input_ids"]) == prompt
        for text in (teacher.think_response(p), teacher.no_think_response(p), teacher.forced_no_think_response(p)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
            assert ids.count(end_think) == text.count("</think>")
        pieces = tok.convert_ids_to_tokens(tok(teacher.think_response(p))["input_ids"])
        assert not any(t.isdigit() and len(t) > 1 for t in pieces)  # one token per digit
