"""Command-line entry of the RL trainer.

    python -m at_core.train --config my.yaml [--model-path DIR] [--resume auto] [key.sub=value ...]

The same entry works as one process, under `torchrun --nproc_per_node N` and under the
`deepspeed` launcher (which adds `--local_rank`); on CPUs set DS_ACCELERATOR=cpu.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from at_core.config import ConfigError, load_config
from at_core.data import DataError, Problem, load_problems


def load_train_problems(cfg: DictConfig) -> List[Problem]:
    """The configured training files, or the tiny arithmetic task when none are given; the
    task only fits the tiny world's models, so a real model without training files is an error."""
    if not cfg.data.train_files:
        from at_core.tiny import is_tiny_world
        from at_core.tiny.task import generate_all

        if cfg.model.path and not is_tiny_world(cfg.model.path):
            raise ConfigError(f"data.train_files is empty: the built-in arithmetic task is only for the tiny world's "
                              f"models, and model.path={cfg.model.path} is not one; set data.train_files=[FILE, ...]")

        return generate_all(cfg.data.tiny_train_size, seed=cfg.seed, split="train")
    problems: List[Problem] = []
    for f in cfg.data.train_files:
        problems += load_problems(f, cfg.data.problem_key, cfg.data.answer_key, cfg.data.answer_extract,
                                  cfg.data.tier_key)
    return problems


def require_model_dir(path: str, name: str = "model.path") -> None:
    """A model path must be a local HF directory: otherwise transformers reads it as a hub repo id
    and fails with a traceback about repo names instead of saying the directory is missing."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{name}={path}: no such directory (an HF model directory with config.json)")
    if not p.is_dir():
        raise ConfigError(f"{name}={path}: not a directory (an HF model directory with config.json)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{name}={path}: not an HF model directory (no config.json)")


def build_parser(prog: str = "at_core.train", description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="YAML config file(s), merged in order")
    p.add_argument("--model-path", help="HF model directory to start from (sets model.path)")
    p.add_argument("--out", help="run directory (sets out_dir)")
    p.add_argument("--resume", help="'auto' (latest complete checkpoint) or a checkpoint directory")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. stage.1.steps=50")
    return p


def resolve_config(args: argparse.Namespace, base_files: Sequence[str] = ()) -> DictConfig:
    overrides = list(args.overrides)
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    return load_config(list(base_files) + list(args.config), overrides)


def setup_logging() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed.*")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        if not cfg.model.path:
            raise ConfigError("model.path is required (an HF model directory; --model-path DIR)")
        require_model_dir(cfg.model.path)
        problems = load_train_problems(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging()
    from at_core.prompts import ChatTemplateError
    from at_core.trainer import train
    from at_rollout.client import RolloutError

    try:
        train(cfg, problems, cfg.model.path)
    except (ChatTemplateError, RolloutError, ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)  # checkpoints written so far stay valid for --resume auto
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
