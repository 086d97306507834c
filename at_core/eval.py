"""Evaluation: pass@1 (mean over samples), pass@k, mean response tokens and think rate.

Follows AUTOTHINK.md section 5 by default (16 samples, temperature 0.6, top_p 0.95, 32K
tokens); works with any HF model directory and any rollout backend (the project's server
or SGLang), on the shipped benchmarks or the user's own JSON/JSONL/parquet files.

    python -m at_core.eval --model DIR --benchmarks math500,aime24 --samples 16 --style ellipsis
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from at_core.data import Problem
from at_core.prompts import PROMPT_STYLES, render_prompt
from at_reward.autothink import detect_mode

Generate = Callable[[List[List[int]], Dict[str, Any]], List[List[Any]]]  # prompts -> samples per prompt
# What the forced no-think prompt already wrote after `<think>\n`: graded as part of the answer.
TIER_ORDER = ("easy", "medium", "hard")
STYLE_PREFIX = {"standard": "", "ellipsis": "", "no_think": "</think>\n\n"}


@dataclass
class EvalSettings:
    style: str = "ellipsis"
    samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    batch_prompts: int = 256  # prompts per generation request (progress granularity)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def generate_samples(generate: Generate, tokenizer, problems: Sequence[Problem], s: EvalSettings,
                     desc: str = "eval", show: bool = True) -> List[List[Any]]:
    prompt_ids = [tokenizer(render_prompt(tokenizer, p.problem, s.style), add_special_tokens=False)["input_ids"]
                  for p in problems]
    params = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": s.samples}
    out: List[List[Any]] = []
    with tqdm(total=len(problems), desc=desc, disable=not show, dynamic_ncols=True, leave=False) as bar:
        for b, start in enumerate(range(0, len(prompt_ids), s.batch_prompts)):
            chunk = prompt_ids[start : start + s.batch_prompts]
            out += generate(chunk, {**params, "sampling_seed": s.seed * 1_000_003 + b})
            bar.update(len(chunk))
    return out


def summarize(problems: Sequence[Problem], samples: Sequence[Sequence[Any]], tokenizer, reward, style: str,
              group_by: str = "tier") -> Dict[str, Any]:
    """Grade every sample; report overall and per group (difficulty tier or benchmark source)."""
    texts, golds = [], []
    for p, group in zip(problems, samples):
        for smp in group:
            texts.append(STYLE_PREFIX[style] + tokenizer.decode(smp.output_ids, skip_special_tokens=True))
            golds.append(p.answer)
    grades = reward.grade_batch(texts, golds)
    per_problem, k = [], 0
    for p, group in zip(problems, samples):
        n = len(group)
        correct = [bool(g.correct and g.format_ok) for g in grades[k : k + n]]
        think = [detect_mode(t) == "think" for t in texts[k : k + n]]
        tokens = [len(smp.output_ids) for smp in group]
        k += n
        per_problem.append({
            "group": (p.tier if group_by == "tier" else Path(p.source).stem) or "all",
            "accuracy": sum(correct) / max(n, 1),
            "pass_at_k": pass_at_k(n, sum(correct), n) if n else 0.0,
            "mean_tokens": sum(tokens) / max(n, 1),
            "think_rate": sum(think) / max(n, 1),
        })

    def mean_of(rows: List[dict]) -> Dict[str, float]:
        keys = ("accuracy", "pass_at_k", "mean_tokens", "think_rate")
        return {key: sum(r[key] for r in rows) / max(len(rows), 1) for key in keys} | {"problems": len(rows)}

    groups = defaultdict(list)
    for r in per_problem:
        groups[r["group"]].append(r)
    result = mean_of(per_problem)
    order = sorted(groups, key=lambda g: (TIER_ORDER.index(g) if g in TIER_ORDER else len(TIER_ORDER), g))
    result["tiers" if group_by == "tier" else "benchmarks"] = {g: mean_of(groups[g]) for g in order}
    if group_by != "tier":  # the paper averages benchmarks, not problems
        result.update({key: sum(v[key] for v in result["benchmarks"].values()) / max(len(groups), 1)
                       for key in ("accuracy", "pass_at_k", "mean_tokens", "think_rate")})
    return result


# ---------------------------------------------------------------- reports


def results_markdown(rows: List[Dict[str, Any]], group_key: str = "tiers", baseline: str = "base/standard",
                     target: Optional[str] = "stage3") -> str:
    """A Table-1-shaped table: accuracy and tokens per group and overall, one row per model/prompt."""
    groups = sorted({g for r in rows for g in r.get(group_key, {})},
                    key=lambda g: (TIER_ORDER.index(g) if g in TIER_ORDER else len(TIER_ORDER), g))
    head = ["model / prompt"] + [f"{g} acc / tok" for g in groups] + ["overall acc", "tokens", "think rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]]
        for g in groups:
            v = r.get(group_key, {}).get(g)
            cells.append(f"{100 * v['accuracy']:.1f} / {v['mean_tokens']:.0f}" if v else "-")
        cells += [f"{100 * r['accuracy']:.1f}", f"{r['mean_tokens']:.1f}", f"{r['think_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    by_name = {r["name"]: r for r in rows}
    if baseline in by_name and target in by_name:
        b, t = by_name[baseline], by_name[target]
        rel = (t["accuracy"] - b["accuracy"]) / max(b["accuracy"], 1e-9) * 100
        cut = (1 - t["mean_tokens"] / max(b["mean_tokens"], 1e-9)) * 100
        lines += ["", f"{target} vs {baseline}: accuracy {rel:+.1f}% relative, tokens {-cut:+.1f}% "
                      f"({cut:.1f}% fewer). The paper (R1-Distill-Qwen-1.5B, stage 3 vs Standard): +6.4% / -52%."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: List[Dict[str, Any]], path: str | Path, title: str = "accuracy vs response tokens") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter(r["mean_tokens"], 100 * r["accuracy"], s=60)
        ax.annotate(r["name"], (r["mean_tokens"], 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=9)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(out_dir: str | Path, rows: List[Dict[str, Any]], group_key: str = "tiers",
                  extra: Optional[Dict[str, Any]] = None, target: Optional[str] = "stage3") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2))
    (out / "results.md").write_text(results_markdown(rows, group_key, target=target))
    plot_tradeoff(rows, out / "tradeoff.png")


# ---------------------------------------------------------------- CLI


def _problems(args) -> List[Problem]:
    from at_core.data import load_benchmark, load_problems

    problems: List[Problem] = []
    for name in filter(None, (args.benchmarks or "").split(",")):
        problems += load_benchmark(name.strip())
    for f in args.files or []:
        problems += load_problems(f, args.problem_key, args.answer_key, args.answer_extract)
    if args.limit:
        by_source = defaultdict(list)
        for p in problems:
            by_source[p.source].append(p)
        problems = [p for rows in by_source.values() for p in rows[: args.limit]]
    if not problems:
        raise SystemExit("error: no problems: give --benchmarks and/or --files")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="at_core.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (tokenizer and, unless --url, weights)")
    ap.add_argument("--benchmarks", default="", help="comma-separated shipped benchmarks, e.g. math500,aime24,amc")
    ap.add_argument("--files", nargs="*", help="your own JSON/JSONL/parquet files")
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--answer-extract", default=None)
    ap.add_argument("--style", default="ellipsis", choices=PROMPT_STYLES)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=32768)
    ap.add_argument("--limit", type=int, default=0, help="at most this many problems per file (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="server", choices=("server", "sglang"),
                    help="which server to launch when no --url is given")
    ap.add_argument("--url", action="append", default=[], help="already-running server(s) to use instead")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="grading processes")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--name", default=None, help="row name in the results (default: model dir name + style)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from at_core.config import load_config
    from at_core.rollout import RolloutWorkers
    from at_reward.registry import build_reward

    problems = _problems(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    overrides = [f"rollout.backend={args.backend}", f"rollout.tp_size={args.tp_size}", f"reward.workers={args.workers}"]
    if args.url:
        overrides.append("rollout.urls=[" + ",".join(args.url) + "]")
    if args.api_key:
        overrides.append(f"rollout.api_key={args.api_key}")
    cfg = load_config(overrides=overrides)
    settings = EvalSettings(args.style, args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    workers = RolloutWorkers(cfg.rollout, args.model, args.out, rank=0, seed=args.seed)
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with build_reward(cfg.reward) as reward:
        try:
            workers.start()
            samples = generate_samples(lambda ids, p: workers.generate(ids, p, None), tokenizer, problems, settings)
        finally:
            workers.close()
        row = summarize(problems, samples, tokenizer, reward, args.style, group_by="source")
    row["name"] = args.name or f"{Path(args.model).name}/{args.style}"
    write_results(args.out, [row], group_key="benchmarks", target=None,
                  extra={"wall_seconds": time.perf_counter() - t0, "settings": vars(args)})
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
