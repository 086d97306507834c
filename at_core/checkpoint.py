"""Checkpoints that survive SIGKILL: DeepSpeed state + where the run was + every RNG.

A checkpoint counts only once its `COMPLETE` marker exists; the marker is written last,
after every rank has finished writing, so a checkpoint cut off half-way is never resumed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"


@dataclass
class TrainState:
    stage: str  # the stage being trained (or about to start)
    step: int  # steps done within `stage`
    global_step: int  # steps done in the whole run
    data_position: int  # prompts consumed from the training stream

    @property
    def tag(self) -> str:
        return f"stage{self.stage}-step{self.step:06d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save(engine, out_dir: str | Path, state: TrainState, keep: int = 2) -> Path:
    """All ranks call this. Writes the engine state, this rank's RNG, then (rank 0) the marker."""
    root = checkpoint_root(out_dir)
    path = root / state.tag
    if _rank() == 0 and path.exists():  # an incomplete leftover with the same tag
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(root), tag=state.tag, save_latest=False)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, path / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (path / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        _fsync_dir(path)
        (path / MARKER).write_text("ok\n")
        _fsync_dir(path)
        _prune(root, keep)
    _barrier()
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _order_key(state: TrainState):
    return (state.global_step, state.step)


def complete_checkpoints(out_dir: str | Path) -> List[tuple[TrainState, Path]]:
    root = checkpoint_root(out_dir)
    found = []
    for d in root.glob("stage*-step*") if root.exists() else []:
        if (d / MARKER).exists() and (d / "trainer_state.json").exists():
            found.append((TrainState(**json.loads((d / "trainer_state.json").read_text())), d))
    return sorted(found, key=lambda x: _order_key(x[0]))


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for _, d in done[: max(0, len(done) - keep)]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("stage*-step*"):  # leftovers of killed saves, older than the newest complete one
        if not (d / MARKER).exists() and done and d.stat().st_mtime < done[-1][1].stat().st_mtime:
            shutil.rmtree(d, ignore_errors=True)


def find(out_dir: str | Path, resume: Optional[str]) -> Optional[Path]:
    """`auto`: the latest complete checkpoint (or None); a path: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(out_dir)
        return done[-1][1] if done else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return path


def load(engine, path: Path) -> TrainState:
    """All ranks call this: restores engine (weights, optimizer, scheduler) and this rank's RNG."""
    engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))
