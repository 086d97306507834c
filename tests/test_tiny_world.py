"""The tiny R1-style world: task generator, teacher traces, SFT base (quick build)."""
import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from at_core.prompts import STYLE_SUFFIX, render_prompt
from at_core.tiny import teacher
from at_core.tiny.sft import MARKER, build_base, evaluate_base, response_text, roles
from at_core.tiny.task import TIERS, generate, generate_all, parse, split_key, split_of, tier_of
from at_reward.autothink import detect_mode
from at_reward.math import grade

EQUATION = re.compile(r"(?<![\d*+])(\d+)([*+])(\d+)=(\d+)")
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
        shapes = {(parse(p.problem).op, tuple(sorted((len(str(parse(p.problem).a)), len(str(parse(p.problem).b))))))
                  for p in problems}
        assert shapes == {"easy": {("+", (1, 1))}, "medium": {("*", (1, 1))}, "hard": {("*", (1, 3))}}[tier]
        if tier == "hard":
            assert all("0" not in str(max(parse(p.problem).a, parse(p.problem).b)) for p in problems)
        assert len({p.problem.split(" ")[0] for p in problems}) >= 3  # several wordings
    interleaved = generate_all(5, seed=0)
    assert [p.tier for p in interleaved[:3]] == list(TIERS)


def _check_trace(problem):
    """Re-derive every step of the teacher's trace; returns the number of steps checked."""
    trace = teacher.think_trace(problem)
    arith = parse(problem.problem)
    lines = trace.splitlines()
    a, b = sorted((arith.a, arith.b), reverse=True) if arith.tier == "hard" else (arith.a, arith.b)
    claim = f"{a}{arith.op}{b}={arith.value}"
    if arith.tier == "hard" and teacher.rechecks(problem.problem):  # the redundant re-check repeats the claim
        assert lines.pop() == teacher.RECHECK.format(claim=claim)
    trace = "\n".join(lines)
    steps = 0
    for x, op, y, z in EQUATION.findall("\n".join(lines[:-1])):  # the last line restates
        x, y, z = int(x), int(y), int(z)
        assert (x + y if op == "+" else x * y) == z, (problem.problem, trace)
        assert op == "+" or (x < 10 and y < 10), trace  # products are single-digit facts
        assert op == "*" or min(x, y) < 10, trace  # sums add a one-digit number
        steps += 1
    for start, numbers in COUNTING.findall(trace):
        seq = [int(n) for n in numbers.split(", ")]
        assert seq == list(range(int(start) + 1, int(start) + 1 + len(seq))) and seq[-1] == arith.value, trace
        steps += len(seq)
    assert lines[-1] == f"So {claim}."
    if arith.tier == "hard":  # long multiplication: each carry comes from the line above
        values = [int(line.split("=")[1]) for line in lines[1:-1]]
        assert [lines[1 + i].split("*")[0] for i in (0, 1, 3)] == list(reversed(str(a)))
        for i in (2, 4):
            assert lines[1 + i].split("+")[1].split("=")[0] == str(values[i - 2] // 10)
        assert int(f"{values[4]}{values[2] % 10}{values[0] % 10}") == arith.value
    return steps


def test_teacher_traces_are_correct_step_by_step():
    for tier in TIERS:
        for p in generate(tier, 400, seed=7) + generate(tier, 100, seed=7, split="test"):
            assert _check_trace(p) >= 3


def test_half_the_hard_traces_recheck_and_only_hard_ones():
    """The re-check is what stage 3's length shaping has to prune: about half the hard
    traces carry it, chosen by the problem text, and no easy or medium trace does."""
    hard = generate("hard", 2000, seed=5)
    share = sum("Wait, let me check" in teacher.think_trace(p) for p in hard) / len(hard)
    assert 0.45 < share < 0.55
    assert not any("Wait" in teacher.think_trace(p) for t in ("easy", "medium") for p in generate(t, 300, seed=5))


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


@pytest.mark.timeout(240)
def test_sft_command_reuses_the_base_and_reports_every_prompt(quick_base, capsys):
    from at_core.tiny.sft import main

    main(["--out", str(quick_base), "--quick", "--eval", "3"])
    out = capsys.readouterr().out
    assert out.startswith(f"built {quick_base}")
    for line in ("standard  T=0.6", "no_think  T=0.6", "ellipsis  T=0.6", "think-on-hard-only projection"):
        assert line in out


def test_ellipsis_mode_is_one_token_choice(quick_base):
    """A tier's think responses all begin with one token, so temperature cannot tilt the mode
    choice: after the ellipsis it is `</think>` or that token."""
    tok = AutoTokenizer.from_pretrained(quick_base)
    for tier in TIERS:
        firsts = {tok(teacher.think_response(p), add_special_tokens=False)["input_ids"][0]
                  for p in generate(tier, 60, seed=9)}
        assert len(firsts) == 1, tier
        assert tok.decode(list(firsts)) == teacher._OPENERS[tier]
    assert {tok(teacher.no_think_response(p), add_special_tokens=False)["input_ids"][0]
            for p in generate_all(20, 9)} == {tok.convert_tokens_to_ids("</think>")}


def test_sft_roles_balance_the_ellipsis_choice_in_every_tier():
    for tier in TIERS:
        cycle = roles(tier)
        assert cycle.count(("ellipsis", "think")) == cycle.count(("ellipsis", "no_think")) == 1
        assert ("standard", "think") in cycle
        assert (("no_think", "no_think") in cycle) == (tier != "hard")


def test_forced_no_think_example_is_an_ellipsis_no_think_example(quick_base):
    """Why hard problems need no forced no-think examples: the forced prompt plus its answer
    is, token for token, the ellipsis prompt plus its no-think response."""
    tok = AutoTokenizer.from_pretrained(quick_base)

    def encode(problem, style, mode):  # as the SFT does: prompt and response tokenised apart
        prompt = tok(render_prompt(tok, problem.problem, style), add_special_tokens=False)["input_ids"]
        return prompt + tok(response_text(problem, mode, style), add_special_tokens=False)["input_ids"], len(prompt)

    for p in generate_all(10, seed=3):
        forced, forced_prompt = encode(p, "no_think", "no_think")
        ellipsis, ellipsis_prompt = encode(p, "ellipsis", "no_think")
        assert forced == ellipsis and forced_prompt == ellipsis_prompt + 2  # "</think>\n\n" moved into the prompt


def test_packed_rows_match_separate_sequences(quick_base):
    import random

    import torch

    from at_core.tiny.sft import collate, pack_rows, sft_examples

    tok = AutoTokenizer.from_pretrained(quick_base)
    model = AutoModelForCausalLM.from_pretrained(quick_base).eval()
    examples = sft_examples(generate_all(4, seed=0), tok)
    rows = pack_rows(examples, 256, random.Random(0))
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert any(len(row) > 1 for row in rows)
    ids, labels, positions = collate(examples, rows, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                seq, n_prompt = examples[i]
                alone = model(input_ids=torch.tensor([seq])).logits[0]
                torch.testing.assert_close(packed[r, at : at + len(seq)], alone, atol=1e-4, rtol=1e-4)
                assert (labels[r, at : at + n_prompt] == -100).all()
                assert labels[r, at + n_prompt : at + len(seq)].tolist() == seq[n_prompt:]
                at += len(seq)


def test_the_last_rows_pair_ellipsis_modes_within_a_tier(quick_base):
    """The problems trained last put each ellipsis think example in a row with an ellipsis
    no-think example of its tier; every example is trained exactly once, and a zero
    paired fraction packs as before (one example at a time)."""
    import random

    from at_core.tiny.sft import Recipe, assign_roles, pack_rows, sft_examples, sft_problems, training_rows

    tok = AutoTokenizer.from_pretrained(quick_base)
    recipe = Recipe(problems_per_tier=60, paired_fraction=0.5)
    problems = sft_problems(recipe)
    examples = sft_examples(problems, tok)
    roles_of = assign_roles(problems)
    rows = training_rows(problems, examples, recipe)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    cut = len(problems) // 2
    head = [row for row in rows if min(row) < cut]
    tail = rows[len(head):]
    assert all(max(row) < cut for row in head) and all(min(row) >= cut for row in tail)  # the paired part comes last
    for row in tail:
        for tier in TIERS:
            modes = [roles_of[i][1] for i in row if roles_of[i][0] == "ellipsis" and problems[i].tier == tier]
            assert abs(modes.count("think") - modes.count("no_think")) <= 1, (tier, modes)
    paired = [row for row in tail if sum(roles_of[i][0] == "ellipsis" for i in row) >= 2]
    assert len(paired) >= len(tail) // 2
    unpaired = training_rows(problems, examples, Recipe(problems_per_tier=60, paired_fraction=0.0))
    assert unpaired == pack_rows(examples, recipe.row_tokens, random.Random(f"tiny-sft-batches:{recipe.seed}"))


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


def test_a_think_trace_opens_with_its_tiers_word():
    """The think branch's first word depends on the tier (and only on it): the mode choice after
    the ellipsis is still one of two tokens per problem, but where it is made the model must
    already know the tier, which is what lets RL tie the choice to difficulty."""
    for tier in TIERS:
        openers = {teacher.think_trace(p).split(",")[0] for p in generate(tier, 40, seed=3)}
        assert openers == {teacher._OPENERS[tier]}
    assert len(set(teacher._OPENERS.values())) == len(TIERS)
