"""The tiny R1-style world: task generator, tokenizer, model and SFT, built locally in minutes."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

SAMPLE_CORPUS = [
    "What is 23 + 47? Let's think step by step and output the final answer within \\boxed{}.",
    "<think>\nOkay, let me work this out. 23 * 47 = 23 * 40 + 23 * 7 = 920 + 161.\n</think>\n\n\\boxed{1081}",
    "</think>\n\nThe answer is \\boxed{70}.",
]


def is_tiny_world(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds one of the tiny world's models (or an export of one)."""
    import json

    try:
        return bool(json.loads((Path(model_dir) / "config.json").read_text()).get("tiny_world", False))
    except (OSError, ValueError):
        return False


def build_random_model(out_dir: str | Path, size: str = "test", corpus: Optional[Iterable[str]] = None,
                       vocab_size: int = 400, seed: int = 0) -> Path:
    """A randomly initialised tiny R1-style HF model directory (tests, benchmarks, rehearsals)."""
    from .model import build_model
    from .tokenizer import build_tokenizer

    corpus = list(corpus) if corpus is not None else SAMPLE_CORPUS * 20
    build_tokenizer(out_dir, corpus, vocab_size=vocab_size)
    build_model(out_dir, size=size, seed=seed)
    return Path(out_dir)
