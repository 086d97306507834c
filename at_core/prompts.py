"""Prompt rendering for the three AutoThink prompt styles (docs/method.md, "Prompts").

The model's own chat template renders the user turn; the style then decides what follows
the template's `<think>\\n`: nothing (standard), an ellipsis the model may close at once
(ellipsis, AutoThink's prompt), or an already-closed think block (forced no-think).
"""
from __future__ import annotations

USER_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
THINK_OPEN = "<think>\n"
STYLE_SUFFIX = {
    "standard": "",
    "ellipsis": "...\n",
    "no_think": "...\n</think>\n\n",
}
PROMPT_STYLES = tuple(STYLE_SUFFIX)


class ChatTemplateError(ValueError):
    """The model directory's tokenizer has no usable chat template."""


def render_prompt(tokenizer, problem: str, style: str = "ellipsis") -> str:
    """The full prompt text for `problem` in `style`, ending the way the method needs."""
    if style not in STYLE_SUFFIX:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatTemplateError(
            f"{where} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
            "an R1-style template ending the generation prompt with '<think>\\n' is required"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem + USER_SUFFIX}], tokenize=False, add_generation_prompt=True
    )
    if not text.endswith(THINK_OPEN):
        # Older R1-Distill templates stop at the assistant tag; the released ones add "<think>\n".
        text += THINK_OPEN
    return text + STYLE_SUFFIX[style]
