"""`reward.rules=reference`: the authors' readings of a response, case by case and on random batches.

Each worked example is a row of docs/method.md's table "Our rules and the authors'"; its
expected rewards are worked out by hand from the reference code's definitions (written in the
comments) and from ours. The random batches compare the reward with an oracle written here
from the same definitions in another form (regular expressions, plain loops).
"""
from __future__ import annotations

import random
import re

import pytest
from omegaconf import OmegaConf

from at_core.config import ConfigError, RunConfig
from at_reward.registry import build_reward

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def prompt(problem: str, style: str = "ellipsis") -> str:
    """The R1 chat prompt as the reference decodes it (special tokens kept)."""
    tail = {"ellipsis": "<think>\n...\n", "no_think": "<think>\n...\n</think>\n\n", "standard": "<think>\n"}[style]
    return BOS + USER + problem + SUFFIX + ASSISTANT + tail


P = prompt("What is 2 + 3?")


def reward(rules: str, **kw):
    cfg = OmegaConf.structured(RunConfig).reward
    cfg.rules, cfg.workers = rules, 1
    for k, v in kw.items():
        cfg[k] = v
    return build_reward(cfg)


def score(rules: str, responses, golds=None, prompts=None):
    golds = golds or ["5"] * len(responses)
    prompts = prompts or [P] * len(responses)
    with reward(rules) as r:
        return r(responses, golds, groups=list(range(len(responses))), lengths=[10] * len(responses), prompts=prompts)


@pytest.mark.timeout(60)
def test_mode_detection_row():
    responses = [
        "</think>\n\nThe answer is \\boxed{5}." + EOS,  # both: no-think, correct: +2
        "</think>\nThe answer is \\boxed{5}." + EOS,  # reference: no "</think>\n\n" -> think, correct: +1
        "</think>The answer is \\boxed{5}.",  # reference: think, +1; ours: no-think, +2
        "</think>\n\\boxed{4}",  # reference: think, wrong: 0; ours: no-think, wrong: -1
    ]
    ref, ours = score("reference", responses), score("project", responses)
    assert ref.think == [False, True, True, True] and ref.base == [2.0, 1.0, 1.0, 0.0]
    assert ours.think == [False, False, False, False] and ours.base == [2.0, 2.0, 2.0, -1.0]


@pytest.mark.timeout(60)
def test_forced_no_think_prompt_makes_every_response_no_think_for_the_reference():
    # The forced prompt itself contains "<think>\n...\n</think>\n\n"; its answer segment runs
    # from the prompt's </think> to the response's first </think> (there is none: to the end).
    out = score("reference", ["The answer is \\boxed{5}."], prompts=[prompt("What is 2 + 3?", "no_think")])
    assert out.think == [False] and out.base == [2.0]


@pytest.mark.timeout(60)
def test_answer_segment_row():
    responses = [
        "Add them.\n</think>\n\n\\boxed{5}\n</think>\n\\boxed{7}",  # ref: between 1st and 2nd </think>: 5
        "Add them.\n</think>\n\n\\boxed{7}\n</think>\n\\boxed{5}",  # ref: 7 (wrong); ours: after the last: 5
        "Add them, 2 + 3 = \\boxed{5}, no close tag",  # no </think> at all: a format error for both
    ]
    ref, ours = score("reference", responses), score("project", responses)
    assert ref.correct == [True, False, False] and ref.base == [1.0, 0.0, 0.0] and ref.format_ok == [True, True, False]
    assert ours.correct == [False, True, False] and ours.base == [0.0, 1.0, 0.0]


@pytest.mark.timeout(60)
def test_box_forms_row():
    responses = [
        "Sum.\n</think>\n\nSo \\boxed 5",  # ref: the last \boxed opens no brace: format error, 0
        "</think>\n\n\\fbox{5}",  # ref: no \boxed at all: format error, 0 (no-think)
        "</think>\n\n\\boxed{5} or \\boxed {6}",  # ref: the last \boxed is "\boxed {6}": not "\boxed{": 0
        "</think>\n\n\\boxed{\\frac{10}{2}}",  # both: nested braces, 5: +2
    ]
    ref, ours = score("reference", responses), score("project", responses)
    assert ref.format_ok == [False, False, False, True] and ref.base == [0.0, 0.0, 0.0, 2.0]
    assert ours.format_ok == [True, True, True, True] and ours.base == [1.0, 2.0, -1.0, 2.0]


@pytest.mark.timeout(60)
def test_degeneration_input_row():
    # A long first word: BOS and the user tag glue onto the problem's first word.
    head = "x" * (120 - len(BOS + USER))  # with them: exactly 120 characters
    long_prompt = prompt(head + " is a variable; what is 2 + 3?")
    wrong = "</think>\n\n\\boxed{4}"
    out = score("reference", [wrong], prompts=[long_prompt])
    assert out.base == [-2.0]  # no-think wrong (-1), and the sequence holds a 120-character word
    assert score("project", [wrong], prompts=[long_prompt]).base == [-1.0]
    short_head = prompt("x" * (119 - len(BOS + USER)) + " is a variable; what is 2 + 3?")
    assert score("reference", [wrong], prompts=[short_head]).base == [-1.0]

    # n-gram chunks are aligned from the prompt's start: "a b" ten times after an odd
    # number of words is chunked as "b a" only nine times, so it is not degenerate.
    repeated = "</think>\n\nx " + "a b " * 10 + "\\boxed{4}"
    odd = prompt("What is 2 + 3 ?")
    assert len(odd.split()) == 19  # the prompt's whitespace-split words
    assert score("reference", [repeated], prompts=[odd]).base == [-1.0]
    assert score("project", [repeated], prompts=[odd]).base == [-2.0]  # response alone: [</think> x], [a b] x 10
    assert len(P.split()) == 18  # an even count keeps the pairs aligned: degenerate for the reference too
    assert score("reference", [repeated]).base == [-2.0]


def test_unknown_rules_name_the_key():
    with pytest.raises(ConfigError, match="reward.rules"):
        reward("authors")


# ---------------------------------------------------------------- random batches against an oracle


def oracle(full: str, gold_values: set[str]):
    """(think, format_ok, correct, base) from the reference code's definitions."""
    think = not (re.search(r"<think>\n\.\.\.\n</think>\n\n", full) or re.match(r"</think>\n\n", full))
    answer = None
    pieces = full.split("</think>")
    if len(pieces) > 1:
        seg = pieces[1]
        starts = [m.start() for m in re.finditer(r"\\boxed", seg)]
        if starts and seg.startswith("\\boxed{", starts[-1]):
            depth, k = 0, starts[-1]
            while k < len(seg):
                depth += {"{": 1, "}": -1}.get(seg[k], 0)
                if seg[k] == "}" and depth == 0:
                    answer = seg[starts[-1] + len("\\boxed{") : k]
                    break
                k += 1
    format_ok = answer is not None
    correct = format_ok and answer in gold_values
    base = 0.0 if not format_ok else {(True, True): 1.0, (True, False): 0.0, (False, True): 2.0,
                                      (False, False): -1.0}[(think, correct)]
    if base < 0:
        words = full.split()
        longest_run = 0
        for n in range(1, 31):
            chunks = [tuple(words[i : i + n]) for i in range(0, len(words) - n + 1, n)]
            run = 1
            for a, b in zip(chunks, chunks[1:]):
                run = run + 1 if a == b else 1
                longest_run = max(longest_run, run)
        if longest_run >= 10 or max(map(len, words)) >= 120:
            base = -2.0
    return think, format_ok, correct, base


OPEN = ["</think>\n\n", "</think>\n", "</think>", "Let me think.\n</think>\n\n", "Hmm, " * 3 + "\n</think>\n\n",
        "", "\n</think>\n\n"]
BODY = ["The answer is ", "So ", "again " * 12, "a b " * 10, "x " + "a b " * 10, "y" * 125 + " ", ""]
BOX = ["\\boxed{5}", "\\boxed{4}", "\\boxed 5", "\\fbox{5}", "\\boxed{\\frac{10}{2}}", "", "\\boxed{5",
       "\\boxed {5}"]
TAIL = ["", "\n</think>\n\\boxed{7}", EOS, "\n</think>\n\n\\boxed{5}" + EOS]


@pytest.mark.timeout(120)
def test_random_batches_match_the_reference_definitions():
    rng = random.Random(0)
    with reward("reference") as r:
        for _ in range(40):
            n = 16
            responses = [rng.choice(OPEN) + rng.choice(BODY) + rng.choice(BOX) + rng.choice(TAIL) for _ in range(n)]
            prompts = [prompt(rng.choice(["What is 2 + 3?", "Add 2 and 3 .", "z" * rng.randint(80, 110) + " + 3?"]),
                              rng.choice(["ellipsis", "ellipsis", "no_think", "standard"])) for _ in range(n)]
            out = r(responses, ["5"] * n, groups=[i // 4 for i in range(n)], lengths=[7] * n, prompts=prompts)
            for i in range(n):
                want = oracle(prompts[i] + responses[i], {"5", "\\frac{10}{2}"})
                got = (out.think[i], out.format_ok[i], out.correct[i], out.base[i])
                assert got == want, (prompts[i], responses[i])


@pytest.mark.timeout(120)
def test_evaluation_reads_responses_by_the_configured_rules(tiny_model_dir):
    """The evaluation runner's mode and answer follow `reward.rules`, prompts included for the
    reference (its evaluation reads prompt + response like its training)."""
    from transformers import AutoTokenizer

    from at_core.data import Problem
    from at_core.eval import grade_samples
    from at_rollout.client import Sample

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["</think>\n\n\\boxed{5}", "</think>\n\\boxed{5}", "Sum.\n</think>\n\nSo \\boxed 5"]
    samples = [[Sample(0, tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], None, "stop")
                for t in texts]]
    problems = [Problem(problem="What is 2 + 3?", answer="5")]
    with reward("reference") as r:
        ref = grade_samples(problems, samples, tok, r, "ellipsis")[0]
    with reward("project") as r:
        ours = grade_samples(problems, samples, tok, r, "ellipsis")[0]
    assert [s["mode"] for s in ref] == ["no_think", "think", "think"]
    assert [s["correct"] for s in ref] == [True, True, False]  # `\boxed 5` is no answer for the reference
    assert [s["mode"] for s in ours] == ["no_think", "no_think", "think"]
    assert [s["correct"] for s in ours] == [True, True, True]
