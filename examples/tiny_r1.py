"""The embedded default: the whole AutoThink method on a tiny R1-style model, on a CPU, in minutes.

    python examples/tiny_r1.py [--quick] [--out DIR] [--resume auto] [dotted.config=overrides ...]

1. SFT: distil a tiny Qwen2 "R1" from a programmatic teacher (built once, then reused).
2. Evaluate the base with the standard, forced no-think and ellipsis prompts.
3. RL stages 1 (batch balance), 2 (accuracy) and 3 (length shaping) through the real
   trainer: DeepSpeed engines (ZeRO-0 in this one process, ZeRO-3 with --quick), the rollout
   server on loopback, weight sync every step; each stage is evaluated with the ellipsis prompt
   when it ends.
4. Write results.json, results.md (Table 1 in miniature), tradeoff.png, think_rate.png.

`--ablations` adds the paper's ablations, each a full RL run from the same base in
<out>/ablations/NAME, evaluated when its last stage ends: no stage 1 (stages 2 and 3 from the
base), no length shaping (stage 3 on the plain reward) and the plain reward in every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from at_core.config import ConfigError, load_config  # noqa: E402
from at_core.eval import EvalSettings, generate_samples, summarize, write_results  # noqa: E402
from at_core.train import require_model_dir  # noqa: E402

CONFIGS = ROOT / "examples" / "configs"
BASE_STYLES = ("standard", "no_think", "ellipsis")


class Phases:
    """Prints each phase as it starts with the time so far; keeps each phase's seconds."""

    def __init__(self):
        self.started = self.mark = time.time()
        self.name = None
        self.seconds: dict[str, float] = {}

    def __call__(self, msg: str, key: str | None = None) -> None:
        """Start a phase; the previous one's seconds go under its key (a phase without one is
        not timed)."""
        if self.name is not None:
            self.seconds[self.name] = round(time.time() - self.mark, 1)
        self.name, self.mark = key, time.time()
        print(f"\n== {msg}   [{self.mark - self.started:.0f} s so far]", flush=True)


phase = Phases()


def settings(cfg, style: str) -> EvalSettings:
    return EvalSettings(style=style, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p, max_new_tokens=cfg.eval.max_response_len, seed=cfg.seed)


def summary_line(row: dict) -> str:
    tiers = " ".join(f"{t} {v['think_rate']:.2f}" for t, v in row["tiers"].items())
    return (f"{row['name']:<14} accuracy {100 * row['accuracy']:5.1f}%  tokens {row['mean_tokens']:6.1f}  "
            f"think rate {row['think_rate']:.2f} ({tiers})")


def read_row(path: Path) -> dict:
    """A cached evaluation row as a results row (without its cache key)."""
    row = json.loads(path.read_text())
    row.pop("cache_key", None)
    return row


def cached_eval(path: Path, name: str, s: EvalSettings, run) -> dict:
    """Evaluation rows are cached in the run directory (with their settings), so `--resume`
    never redoes one and a changed setting never reuses a stale one."""
    key = {"settings": vars(s)}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.pop("cache_key", None) == key:
            return cached
    row = {"name": name, **run()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**row, "cache_key": key}, indent=2))
    return row


def evaluate_base(cfg, base: Path, held_out, out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from at_core.rollout import RolloutWorkers
    from at_reward.registry import build_reward

    tokenizer = AutoTokenizer.from_pretrained(base)
    workers = RolloutWorkers(cfg.rollout, str(base), out, rank=0, seed=cfg.seed)
    rows = []
    with build_reward(cfg.reward) as reward:
        try:
            for style in BASE_STYLES:
                def run(style=style):
                    if not workers.clients:
                        workers.start()  # only when some evaluation is not cached
                    gen = lambda ids, p: workers.generate(ids, p, None)  # noqa: E731
                    samples = generate_samples(gen, tokenizer, held_out, settings(cfg, style), desc=f"base/{style}")
                    return summarize(held_out, samples, tokenizer, reward, style)

                rows.append(cached_eval(out / "eval" / f"base_{style}.json", f"base/{style}", settings(cfg, style), run))
                print(summary_line(rows[-1]), flush=True)
        finally:
            workers.close()
    return rows


def stage_end_eval(held_out, out: Path, only: str | None = None, prefix: str = ""):
    """The trainer's stage-end hook: evaluate the just-synced policy through its own server
    (every stage, or `only` that one), as row `<prefix>stage<N>` in <out>/eval/stage<N>.json."""
    from at_core.engines import policy_lm

    def hook(ctx, stage: str, export_dir: Path) -> None:
        if only is not None and stage != only:
            return
        s = settings(ctx.cfg, "ellipsis")
        name = f"{prefix}stage{stage}"
        gen = lambda ids, p: ctx.rollout.generate(ids, p, policy_lm(ctx.engine))  # noqa: E731
        samples = generate_samples(gen, ctx.tokenizer, held_out, s, desc=name, show=ctx.rank == 0)
        if ctx.rank == 0:
            path = out / "eval" / f"stage{stage}.json"
            path.unlink(missing_ok=True)  # the stage was (re)trained: its old row is stale
            row = cached_eval(path, name, s,
                              lambda: summarize(held_out, samples, ctx.tokenizer, ctx.reward, "ellipsis"))
            print(summary_line(row), flush=True)

    return hook


# The paper's ablations: config overrides on the main recipe, each run from the same base.
ABLATIONS = {
    "no_stage1": ["start_stage=2"],
    "no_length_shaping": ["stage.3.shaping.length_alpha=0", "stage.3.shaping.length_beta=0"],
    "plain_reward": ["stage.1.shaping.balance_target=null",
                     "stage.3.shaping.length_alpha=0", "stage.3.shaping.length_beta=0"],
}


def run_ablations(files, overrides: list[str], base: Path, train_problems, held_out, out: Path) -> list[dict]:
    """Each ablation trains from `base` in <out>/ablations/NAME and yields one row, its last
    stage's evaluation; `overrides` carry the main run's (its `resume` included)."""
    from at_core.config import load_config, stage_order
    from at_core.trainer import train

    rows = []
    for name, changes in ABLATIONS.items():
        run_dir = out / "ablations" / name
        cfg = load_config(files, overrides + changes + [f"out_dir={run_dir}", f"model.path={base}"])
        last = stage_order(cfg)[-1]
        phase(f"ablation {name}: {' '.join(changes)}", f"ablation/{name}")
        train(cfg, train_problems, str(base), on_stage_end=stage_end_eval(held_out, run_dir, last, f"{name}/"))
        rows.append(read_row(run_dir / "eval" / f"stage{last}.json"))
    return rows


def plot_think_rate(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from at_core.recorder import read_metrics

    recs = read_metrics(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    for tier in ("easy", "medium", "hard"):
        pts = [(r["global_step"], r[f"think_rate/{tier}"]) for r in recs if f"think_rate/{tier}" in r]
        if pts:
            ax.plot(*zip(*pts), label=tier, marker=".", lw=1)
    for a, b in zip(recs, recs[1:]):
        if a["stage"] != b["stage"]:
            ax.axvline(a["global_step"] + 0.5, color="grey", ls="--", lw=0.8)
            ax.text(a["global_step"] + 0.7, 1.02, f"stage {b['stage']}", fontsize=8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("think rate (training batch)")
    ax.set_ylim(-0.02, 1.08)
    ax.set_title("think rate by difficulty over training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "think_rate.png", dpi=120)
    plt.close(fig)
    return out / "think_rate.png"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same pipeline, small and fast (tests)")
    ap.add_argument("--out", default=None, help="run directory (default runs/tiny or runs/tiny_quick)")
    ap.add_argument("--resume", default=None, help="'auto': continue a killed run from its last checkpoint")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every process (default: all cores); on some CPUs another count "
                         "orders the float sums differently, and so is another trajectory")
    ap.add_argument("--ablations", action="store_true",
                    help="also run the paper's ablations (no stage 1, no length shaping, plain reward)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. stage.1.steps=10")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the rollout server and reward workers inherit it
    out = Path(args.out or ("runs/tiny_quick" if args.quick else "runs/tiny"))
    files = [CONFIGS / "tiny_r1.yaml"] + ([CONFIGS / "tiny_r1_quick.yaml"] if args.quick else [])
    resume = [f"resume={args.resume}"] if args.resume else []
    try:
        cfg = load_config([str(f) for f in files], list(args.overrides) + [f"out_dir={out}"] + resume)
        if cfg.model.path:
            require_model_dir(cfg.model.path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from at_core.tiny import targets
    from at_core.tiny.sft import build_base
    from at_core.tiny.task import generate_all
    from at_core.train import setup_logging
    from at_core.trainer import train

    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    setup_logging()
    phase("1/4 SFT: the tiny R1-style base (built once, then reused)", "sft")
    base = (Path(cfg.model.path) if cfg.model.path
            else build_base(out / "base", quick=args.quick, seed=cfg.seed, threads=threads))
    held_out = generate_all(cfg.data.tiny_eval_size, seed=cfg.seed + 1, split="test")
    train_problems = generate_all(cfg.data.tiny_train_size, seed=cfg.seed, split="train")

    phase(f"2/4 evaluate the base on {len(held_out)} held-out problems (standard, forced no-think, ellipsis)",
          "base_eval")
    rows = evaluate_base(cfg, base, held_out, out)

    phase("3/4 RL: stage 1 (batch balance) -> stage 2 (accuracy) -> stage 3 (length shaping)", "rl")
    train(cfg, train_problems, str(base), on_stage_end=stage_end_eval(held_out, out))
    for s in sorted(cfg.stage):
        path = out / "eval" / f"stage{s}.json"
        if path.exists():
            rows.append(read_row(path))

    if args.ablations:
        rows += run_ablations([str(f) for f in files], list(args.overrides) + resume, base, train_problems,
                              held_out, out)

    phase("4/4 results")
    checks = targets.check(rows)
    write_results(out, rows, extra={"wall_seconds": time.time() - phase.started, "phase_seconds": phase.seconds,
                                    "seed": cfg.seed, "threads": threads, "quick": args.quick, "targets": checks})
    with (out / "results.md").open("a") as f:
        met = sum(c["met"] is True for c in checks)
        f.write(f"\nTargets ({met} of {len(checks)} met{'; --quick checks the pipeline, not the effect' if args.quick else ''}):"
                f"\n\n" + targets.markdown(checks))
    plot_think_rate(out)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, tradeoff.png, think_rate.png, metrics.jsonl, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
