"""The embedded default: the whole AutoThink method on a tiny R1-style model, on a CPU, in minutes.

    python examples/tiny_r1.py [--quick] [--out DIR] [--resume auto] [dotted.config=overrides ...]

1. SFT: distil a tiny Qwen2 "R1" from a programmatic teacher (built once, then reused).
2. Evaluate the base with the standard, forced no-think and ellipsis prompts.
3. RL stages 1 (batch balance), 2 (accuracy) and 3 (length shaping) through the real
   trainer: DeepSpeed ZeRO-3, the rollout server on loopback, weight sync every step;
   each stage is evaluated with the ellipsis prompt when it ends.
4. Write results.json, results.md (Table 1 in miniature), tradeoff.png, think_rate.png.
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


def phase(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def settings(cfg, style: str) -> EvalSettings:
    return EvalSettings(style=style, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p, max_new_tokens=cfg.eval.max_response_len, seed=cfg.seed)


def summary_line(row: dict) -> str:
    tiers = " ".join(f"{t} {v['think_rate']:.2f}" for t, v in row["tiers"].items())
    return (f"{row['name']:<14} accuracy {100 * row['accuracy']:5.1f}%  tokens {row['mean_tokens']:6.1f}  "
            f"think rate {row['think_rate']:.2f} ({tiers})")


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


def stage_end_eval(held_out, out: Path):
    """The trainer's stage-end hook: evaluate the just-synced policy through its own server."""
    from at_core.engines import policy_lm

    def hook(ctx, stage: str, export_dir: Path) -> None:
        s = settings(ctx.cfg, "ellipsis")
        gen = lambda ids, p: ctx.rollout.generate(ids, p, policy_lm(ctx.engine))  # noqa: E731
        samples = generate_samples(gen, ctx.tokenizer, held_out, s, desc=f"stage{stage}", show=ctx.rank == 0)
        if ctx.rank == 0:
            path = out / "eval" / f"stage{stage}.json"
            path.unlink(missing_ok=True)  # the stage was (re)trained: its old row is stale
            row = cached_eval(path, f"stage{stage}", s,
                              lambda: summarize(held_out, samples, ctx.tokenizer, ctx.reward, "ellipsis"))
            print(summary_line(row), flush=True)

    return hook


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
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. stage.1.steps=10")
    args = ap.parse_args(argv)
    started = time.time()
    out = Path(args.out or ("runs/tiny_quick" if args.quick else "runs/tiny"))
    files = [CONFIGS / "tiny_r1.yaml"] + ([CONFIGS / "tiny_r1_quick.yaml"] if args.quick else [])
    extra = [f"out_dir={out}"] + ([f"resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config([str(f) for f in files], list(args.overrides) + extra)
        if cfg.model.path:
            require_model_dir(cfg.model.path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from at_core.tiny.sft import build_base
    from at_core.tiny.task import generate_all
    from at_core.train import setup_logging
    from at_core.trainer import train

    setup_logging()
    phase("1/4 SFT: the tiny R1-style base (built once, then reused)")
    base = Path(cfg.model.path) if cfg.model.path else build_base(out / "base", quick=args.quick, seed=cfg.seed)
    held_out = generate_all(cfg.data.tiny_eval_size, seed=cfg.seed + 1, split="test")
    train_problems = generate_all(cfg.data.tiny_train_size, seed=cfg.seed, split="train")

    phase(f"2/4 evaluate the base on {len(held_out)} held-out problems (standard, forced no-think, ellipsis)")
    rows = evaluate_base(cfg, base, held_out, out)

    phase("3/4 RL: stage 1 (batch balance) -> stage 2 (accuracy) -> stage 3 (length shaping)")
    train(cfg, train_problems, str(base), on_stage_end=stage_end_eval(held_out, out))
    for s in sorted(cfg.stage):
        path = out / "eval" / f"stage{s}.json"
        if path.exists():
            row = json.loads(path.read_text())
            row.pop("cache_key", None)
            rows.append(row)

    phase("4/4 results")
    write_results(out, rows, extra={"wall_seconds": time.time() - started, "seed": cfg.seed, "quick": args.quick})
    plot_think_rate(out)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, tradeoff.png, think_rate.png, metrics.jsonl, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
