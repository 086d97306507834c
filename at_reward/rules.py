"""How a response is read: its mode, where its answer is, what the degeneration check sees.

Two rule sets, chosen by `reward.rules` (docs/method.md, "Our rules and the authors'"):

- `project` (the default): the text right after the ellipsis prompt decides the mode (it
  starts with `</think>`: no-think), the answer is the last box after the *last*
  `</think>` (`\\boxed{..}`, `\\boxed x`, `\\fbox{..}`), the degeneration check reads the
  response alone. Robust to the small variations new models and domains produce.
- `reference`: the authors' reward code exactly. It reads prompt + response decoded as one
  sequence with special tokens: no-think iff that text contains `<think>\\n...\\n</think>\\n\\n`
  or starts with `</think>\\n\\n`; the answer is searched between the first and the second
  `</think>`; only `\\boxed{...}` counts (the last `\\boxed`, braces counted plainly); the
  degeneration check reads the whole sequence.

Correctness itself (math-verify) is the same under both.
"""
from __future__ import annotations

from typing import Optional

from at_reward.autothink import detect_mode
from at_reward.math import THINK_END, extract_answer

REFERENCE_NO_THINK = "<think>\n...\n</think>\n\n"  # the ellipsis prompt closed at once
REFERENCE_NO_THINK_START = "</think>\n\n"


class Rules:
    """The default (`project`) rules; `reference` overrides every reading."""

    name = "project"
    # Whether the trainer should decode with special tokens and pass the prompts (the
    # reference code decodes prompt + response with `tokenizer.decode` defaults).
    needs_prompts = False

    def text(self, prompt: str, response: str) -> str:
        """What the grader and the other readings see."""
        return response

    def think(self, prompt: str, response: str) -> bool:
        return detect_mode(response) == "think"

    def answer(self, text: str) -> Optional[str]:
        """The extracted answer of `text(prompt, response)`; None is a format error."""
        return extract_answer(text)

    def degeneration_text(self, prompt: str, response: str) -> str:
        return response


class ReferenceRules(Rules):
    name = "reference"
    needs_prompts = True

    def text(self, prompt: str, response: str) -> str:
        return prompt + response

    def think(self, prompt: str, response: str) -> bool:
        full = prompt + response
        return not (REFERENCE_NO_THINK in full or full.startswith(REFERENCE_NO_THINK_START))

    def answer(self, text: str) -> Optional[str]:
        parts = text.split(THINK_END)
        if len(parts) < 2:
            return None
        return reference_boxed(parts[1])

    def degeneration_text(self, prompt: str, response: str) -> str:
        return prompt + response


def reference_boxed(segment: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` as the reference extracts it.

    The last `\\boxed` must open a brace at once (`\\boxed 6` is no answer); braces are counted
    from there with no regard for `\\{`; `\\fbox` only counts when there is no `\\boxed` at
    all, and then fails the `\\boxed{` prefix test, so it is no answer either.
    """
    start = segment.rfind("\\boxed")
    if start < 0:
        return None  # a lone \fbox{..} is found by the reference and then rejected
    depth = 0
    for k in range(start, len(segment)):
        ch = segment[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                boxed = segment[start : k + 1]
                prefix = "\\boxed{"
                return boxed[len(prefix) : -1] if boxed.startswith(prefix) else None
    return None


RULES = {"project": Rules(), "reference": ReferenceRules()}


def rules_named(name: str) -> Rules:
    if name not in RULES:
        raise ValueError(f"reward.rules must be one of {', '.join(RULES)}, got {name!r}")
    return RULES[name]
