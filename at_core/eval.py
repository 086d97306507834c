"""Evaluation: pass@1 (mean over samples), pass@k, mean response tokens and think rate.

Follows the paper's protocol by default (docs/method.md, "Evaluation protocol": 16 samples,
temperature 0.6, top_p 0.95, 32K tokens); works with any HF model directory and any rollout backend (the project's server
or SGLang), on the shipped benchmarks or the user's own JSON/JSONL/parquet files.

    python -m at_core.eval --model DIR --benchmarks math500,aime24 --samples 16 --style ellipsis
    python -m at_core.eval --model DIR --benchmarks math500 --group-by difficulty --resume

Every graded sample goes to <out>/generations.jsonl as it is graded (prompt, response,
tokens, mode, extracted answer, correct, the data row's other fields); `--resume` continues
an interrupted run from it. `--group-by FIELD` adds a table and a think-rate plot per value
of a data-row field (MATH500's `difficulty` is the MATH level 1-5).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import queue
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from at_core.data import Problem
from at_core.eval_report import (  # noqa: F401 - the report helpers are part of this module's API
    TIER_ORDER, group_results, mean_of, pass_at_k, plot_tradeoff, problem_metrics, results_markdown, write_results)
from at_core.prompts import PROMPT_STYLES, render_prompt

Generate = Callable[[List[List[int]], Dict[str, Any]], List[List[Any]]]  # prompts -> samples per prompt
# What the forced no-think prompt already wrote after `<think>\n`: graded as part of the answer.
STYLE_PREFIX = {"standard": "", "ellipsis": "", "no_think": "</think>\n\n"}


@dataclass
class EvalSettings:
    style: str = "ellipsis"
    samples: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    batch_prompts: int = 256  # prompts per generation request: progress and resume granularity


def chunk_requests(tokenizer, problems: Sequence[Problem], s: EvalSettings
                   ) -> List[Tuple[range, List[List[int]], Dict[str, Any]]]:
    """(problem positions, prompt ids, sampling params) of each request of `batch_prompts`
    problems. Request b is always seeded `seed * 1_000_003 + b`, so a request done before an
    interruption can be left out without changing any other request's samples."""
    params = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": s.samples}
    out = []
    for b, start in enumerate(range(0, len(problems), s.batch_prompts)):
        idx = range(start, min(start + s.batch_prompts, len(problems)))
        ids = [tokenizer(render_prompt(tokenizer, problems[i].problem, s.style), add_special_tokens=False)
               ["input_ids"] for i in idx]
        out.append((idx, ids, {**params, "sampling_seed": s.seed * 1_000_003 + b}))
    return out


def generate_samples(generate: Generate, tokenizer, problems: Sequence[Problem], s: EvalSettings,
                     desc: str = "eval", show: bool = True) -> List[List[Any]]:
    out: List[List[Any]] = []
    with tqdm(total=len(problems), desc=desc, disable=not show, dynamic_ncols=True, leave=False) as bar:
        for idx, ids, params in chunk_requests(tokenizer, problems, s):
            out += generate(ids, params)
            bar.update(len(idx))
    return out


def grade_samples(problems: Sequence[Problem], samples: Sequence[Sequence[Any]], tokenizer, reward,
                  style: str) -> List[List[Dict[str, Any]]]:
    """Per problem, per sample: response text, tokens, finish reason, mode, extracted answer, correct.

    Mode and answer are read by the reward's rules (`reward.rules`): ours read the response
    (after what a forced prompt already wrote), the reference's read prompt + response decoded
    with special tokens, as the authors' evaluation does.
    """
    rules = reward.rules
    texts, read, golds = [], [], []
    for p, group in zip(problems, samples):
        prompt = render_prompt(tokenizer, p.problem, style) if rules.needs_prompts else ""
        for smp in group:
            text = tokenizer.decode(smp.output_ids, skip_special_tokens=True)
            texts.append(text)
            if rules.needs_prompts:
                read.append((prompt, tokenizer.decode(smp.output_ids, skip_special_tokens=False)))
            else:
                read.append(("", STYLE_PREFIX[style] + text))
            golds.append(p.answer)
    grades = reward.grade_batch([rules.text(pr, r) for pr, r in read], golds)
    out, k = [], 0
    for group in samples:
        out.append([{"sample": j, "response": texts[k + j], "tokens": len(smp.output_ids),
                     "finish_reason": getattr(smp, "finish_reason", None),
                     "mode": "think" if rules.think(*read[k + j]) else "no_think", "answer": grades[k + j].answer,
                     "correct": bool(grades[k + j].correct and grades[k + j].format_ok)}
                    for j, smp in enumerate(group)])
        k += len(group)
    return out


def summarize_graded(problems: Sequence[Problem], graded: Sequence[Sequence[Dict[str, Any]]],
                     group_by: str = "tier") -> Dict[str, Any]:
    """Overall and per group (difficulty tier, or benchmark source) from graded samples."""
    groups = defaultdict(list)
    per_problem = []
    for p, samples in zip(problems, graded):
        m = problem_metrics(samples)
        per_problem.append(m)
        groups[(p.tier if group_by == "tier" else Path(p.source).stem) or "all"].append(m)
    result = mean_of(per_problem)
    order = sorted(groups, key=lambda g: (TIER_ORDER.index(g) if g in TIER_ORDER else len(TIER_ORDER), g))
    result["tiers" if group_by == "tier" else "benchmarks"] = {g: mean_of(groups[g]) for g in order}
    if group_by != "tier":  # the paper averages benchmarks, not problems
        result.update({key: sum(v[key] for v in result["benchmarks"].values()) / max(len(groups), 1)
                       for key in ("accuracy", "pass_at_k", "mean_tokens", "think_rate")})
    return result


def summarize(problems: Sequence[Problem], samples: Sequence[Sequence[Any]], tokenizer, reward, style: str,
              group_by: str = "tier") -> Dict[str, Any]:
    """Grade every sample; report overall and per group (difficulty tier or benchmark source)."""
    return summarize_graded(problems, grade_samples(problems, samples, tokenizer, reward, style), group_by)


# ---------------------------------------------------------------- CLI


def _problems(args) -> List[Tuple[str, Problem]]:
    """(source label, problem): a shipped benchmark's name, or the file as given."""
    from at_core.data import DataError, load_benchmark, load_problems

    problems: List[Tuple[str, Problem]] = []
    names = dict.fromkeys(filter(None, (n.strip() for n in (args.benchmarks or "").split(","))))  # once each
    for name in names:
        problems += [(name, p) for p in load_benchmark(name)]
    for f in dict.fromkeys(args.files or []):
        problems += [(f, p) for p in load_problems(f, args.problem_key, args.answer_key, args.answer_extract)]
    if args.limit:
        seen: Dict[str, int] = defaultdict(int)
        kept = []
        for label, p in problems:
            seen[label] += 1
            if seen[label] <= args.limit:
                kept.append((label, p))
        problems = kept
    if not problems:
        raise DataError("no problems: give --benchmarks and/or --files")
    return problems


def _row_fields(labelled: Sequence[Tuple[str, Problem]], args) -> List[Dict[str, Any]]:
    """Each problem's data row minus the problem and answer fields (difficulty, unique_id, ...)."""
    from at_core.data import BENCHMARKS, read_rows

    rows_of: Dict[str, list] = {}
    out = []
    for label, p in labelled:
        if p.source not in rows_of:
            rows_of[p.source] = read_rows(p.source)
        spec = BENCHMARKS.get(label)
        drop = {spec.problem_key, spec.answer_key} if spec else {args.problem_key, args.answer_key}
        row = rows_of[p.source][p.index]
        out.append({k: v for k, v in row.items() if k not in drop})
    return out


def eval_settings_record(args, labelled: Sequence[Tuple[str, Problem]]) -> Dict[str, Any]:
    """What decides the samples: a resumed run must match these exactly."""
    digest = hashlib.sha256(json.dumps([[label, p.index, p.problem, p.answer] for label, p in labelled],
                                       default=str).encode()).hexdigest()
    return {"model": str(Path(args.model).resolve()), "style": args.style, "samples": args.samples,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "batch_prompts": args.batch_prompts, "backend": args.backend, "rules": args.rules,
            "benchmarks": list(dict.fromkeys(filter(None, (n.strip() for n in args.benchmarks.split(","))))),
            "files": [str(Path(f).resolve()) for f in args.files or []],
            "problem_key": args.problem_key, "answer_key": args.answer_key, "answer_extract": args.answer_extract,
            "limit": args.limit, "problems": len(labelled), "problems_sha256": digest}


def in_flight(calls: Sequence[Callable[[], Any]], inflight: int) -> Iterator[Any]:
    """Run `calls` at most `inflight` at a time and yield their results as they finish (a call's
    error is raised here). Daemon threads, so an interrupt never waits for a request to end;
    the next call starts before a result is handed over, so generation overlaps grading."""
    done: "queue.Queue" = queue.Queue()
    pending = iter(calls)
    running = 0

    def run(call):
        try:
            done.put((call(), None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            done.put((None, err))

    def start_next() -> None:
        nonlocal running
        call = next(pending, None)
        if call is not None:
            threading.Thread(target=run, args=(call,), name="eval-request", daemon=True).start()
            running += 1

    for _ in range(max(1, inflight)):
        start_next()
    while running:
        result, err = done.get()
        running -= 1
        if err is not None:
            raise err
        start_next()
        yield result


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--batch-prompts", type=int, default=32,
                    help="problems per generation request; a resumed run redoes at most one such request")
    ap.add_argument("--inflight", type=int, default=0,
                    help="generation requests in flight (0: 1 with the project's server, which runs one batch "
                         "at a time; 2 with SGLang, whose continuous batching fills one request's tail)")
    ap.add_argument("--group-by", default="", help="comma-separated data-row fields to report by, e.g. difficulty")
    ap.add_argument("--resume", action="store_true", help="continue <out>/generations.jsonl (same settings only)")
    ap.add_argument("--overwrite", action="store_true", help="start over, replacing <out>/generations.jsonl")
    from at_rollout.backends import BACKENDS

    ap.add_argument("--backend", default="server", choices=tuple(BACKENDS),
                    help="which server to launch when no --url is given")
    ap.add_argument("--url", action="append", default=[], help="already-running server(s) to use instead")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="grading processes")
    ap.add_argument("--rules", default="project", choices=("project", "reference"),
                    help="how mode and answer are read (reward.rules; docs/method.md)")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--name", default=None, help="row name in the results (default: model dir name + style)")
    return ap


def _generate_missing(args, labelled, rows, log, settings: EvalSettings) -> None:
    """Generate and grade every request with a (problem, sample) pair not yet in the log."""
    from transformers import AutoTokenizer

    from at_core.config import load_config
    from at_core.rollout import RolloutWorkers
    from at_reward.registry import build_reward

    problems = [p for _, p in labelled]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    todo = [(idx, ids, params) for idx, ids, params in chunk_requests(tokenizer, problems, settings)
            if any((labelled[i][0], labelled[i][1].index, j) not in log.done for i in idx for j in range(args.samples))]
    if not todo:
        return
    overrides = [f"rollout.backend={args.backend}", f"rollout.tp_size={args.tp_size}", f"reward.workers={args.workers}",
                 f"reward.rules={args.rules}"]
    if args.url:
        overrides.append("rollout.urls=[" + ",".join(args.url) + "]")
    if args.api_key:
        overrides.append(f"rollout.api_key={args.api_key}")
    cfg = load_config(overrides=overrides)
    workers = RolloutWorkers(cfg.rollout, args.model, args.out, rank=0, seed=args.seed)
    inflight = args.inflight or (2 if workers.backend.continuous_batching else 1)

    def request(idx, ids, params):
        return idx, workers.generate(ids, params, None)

    def records(i: int, graded: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        label, p = labelled[i]
        prompt = render_prompt(tokenizer, p.problem, args.style)
        for s in graded:
            yield {"source": label, "problem_index": p.index, "sample": s["sample"], "prompt": prompt, **s,
                   "gold": p.answer, "row": rows[i]}

    with build_reward(cfg.reward) as reward:
        try:
            workers.start()
            done = len(problems) - sum(len(r[0]) for r in todo)
            with tqdm(total=len(problems), initial=done, desc="eval", dynamic_ncols=True, leave=False) as bar:
                for idx, samples in in_flight([functools.partial(request, *r) for r in todo], inflight):
                    graded = grade_samples([problems[i] for i in idx], samples, tokenizer, reward, args.style)
                    log.append(r for i, g in zip(idx, graded) for r in records(i, g))
                    bar.update(len(idx))
        finally:
            workers.close()


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from at_core.config import ConfigError
    from at_core.data import DataError
    from at_core.generations import GenerationsLog, ResumeError
    from at_core.prompts import ChatTemplateError
    from at_core.train import require_model_dir
    from at_rollout.client import RolloutError

    try:
        require_model_dir(args.model, "--model")
        labelled = _problems(args)
        rows = _row_fields(labelled, args)
        fields = [f.strip() for f in args.group_by.split(",") if f.strip()]
        for f in fields:
            if not any(f in r for r in rows):
                known = sorted({k for r in rows for k in r})
                raise DataError(f"--group-by {f}: no problem's row has that field "
                                f"(fields: {', '.join(known) or 'none besides the problem and answer'})")
        if args.samples < 1 or args.batch_prompts < 1:
            raise ConfigError("--samples and --batch-prompts must be at least 1")
        settings_rec = eval_settings_record(args, labelled)
        log = GenerationsLog(args.out, settings_rec, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = EvalSettings(args.style, args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed,
                            args.batch_prompts)
    if log.records:
        print(f"resuming {log.path}: {len(log.records)} of {len(labelled) * args.samples} samples done", flush=True)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupted)  # so the server is stopped and the log closed
    try:
        with log:
            _generate_missing(args, labelled, rows, log, settings)
    except KeyboardInterrupt:
        print(f"interrupted: {len(log.records)} of {len(labelled) * args.samples} samples are in {log.path}; "
              "continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ChatTemplateError, RolloutError) as err:
        print(f"error: {err} ({len(log.records)} samples kept in {log.path}; --resume continues)", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(args, labelled, log, fields, time.perf_counter() - t0)
    return 0


def report(args, labelled, log, fields: Sequence[str], seconds: float) -> None:
    """results.json / results.md / plots from the generations file, so a resumed run counts every sample."""
    order = {(label, p.index): i for i, (label, p) in enumerate(labelled)}
    records = log.ordered(order)
    per_problem: Dict[Tuple[str, int], List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        per_problem[(r["source"], int(r["problem_index"]))].append(r)
    problems = [p for _, p in labelled]
    graded = [per_problem[(label, p.index)] for label, p in labelled]
    row = summarize_graded(problems, graded, group_by="source")
    row["name"] = args.name or f"{Path(args.model).name}/{args.style}"
    groups = {f: group_results(records, f) for f in fields}
    write_results(args.out, [row], group_key="benchmarks", target=None, groups=groups, title=args.benchmarks,
                  extra={"wall_seconds": seconds, "samples_total": len(records), "settings": vars(args)})
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
