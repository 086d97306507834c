"""Grading throughput and latency: GradingPool (2 workers) against in-process `grade`.

Workloads, all from the five paper benchmarks (data/benchmarks):
  golds        every gold written as a model would answer (`</think>\\n\\n\\boxed{GOLD}`): correct
  wrong        an even spread of problems answered with the next problem's gold: wrong,
               and never settled by the exact-match shortcut, so math-verify runs on each
  train_batch  a training-like batch: 64 problems x 8 rollouts, a mix of correct, wrong
               and format-error responses with 2,000-word reasoning before `</think>`
  adversarial  towers of exponents, 50,000-character answers, deep nesting, junk bytes

The baseline is in-process `at_reward.math.grade`, one response after another, measured in
the same run (skipped for `adversarial`: in-process grading of those is unbounded, which
is the point of the pool). Latency is per response: dispatch to verdict for the pool.

    python benchmarks/grading.py [--workers 2] [--timeout 5] [--wrong 300]
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from at_core.data import PAPER_BENCHMARKS, load_benchmark  # noqa: E402
from at_reward.math import gold_alternatives, grade  # noqa: E402
from at_reward.pool import GradingPool  # noqa: E402

ADVERSARIAL = [
    "9^{9^{9^{9}}}",
    "2^{3^{4^{5}}} - 1",
    "1+" * 25000,
    "\\frac{" * 60 + "1" + "}{2}" * 60,
    "\\sqrt{" * 100 + "2" + "}" * 100,
    "\\frac{1}{2}}}}{{{",
    bytes(range(256)).decode("latin-1") * 4,
]


def answer(text: str, think: str = "") -> str:
    return f"{think}</think>\n\n\\boxed{{{text}}}"


def workloads(n_wrong: int, seed: int = 0) -> dict[str, list[tuple[str, object]]]:
    rng = random.Random(seed)
    problems = {name: load_benchmark(name) for name in PAPER_BENCHMARKS}
    flat = [p for ps in problems.values() for p in ps]
    golds = [(answer(gold_alternatives(p.answer)[0]), p.answer) for p in flat]
    wrong = []
    per_bench = max(1, n_wrong // len(problems))
    for ps in problems.values():
        step = max(1, len(ps) // per_bench)
        for i in range(0, len(ps), step)[:per_bench]:
            w = gold_alternatives(ps[(i + 1) % len(ps)].answer)[0]
            if w not in gold_alternatives(ps[i].answer):
                wrong.append((answer(w), ps[i].answer))
    rng.shuffle(wrong)  # adjacent pairs share strings (answer i = gold i+1): no free cache hits
    words = "so we compute the sum and check the case where n is even and then odd".split()
    batch = []
    for p in rng.sample(problems["math500"], 64):
        for _ in range(8):
            think = " ".join(rng.choice(words) for _ in range(2000)) + "\n"
            roll = rng.random()
            if roll < 0.5:
                batch.append((answer(gold_alternatives(p.answer)[0], think), p.answer))
            elif roll < 0.85:
                other = rng.choice(flat)
                batch.append((answer(gold_alternatives(other.answer)[0], think), p.answer))
            else:
                batch.append((think + "and I ran out of tokens", p.answer))
    adversarial = [(answer(a), "7") for a in ADVERSARIAL] * 4
    return {"golds": golds, "wrong": wrong, "train_batch": batch, "adversarial": adversarial}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_pool(pool: GradingPool, pairs) -> tuple[float, list[float], int]:
    t0 = time.perf_counter()
    grades = pool.grade_batch(pairs)
    return time.perf_counter() - t0, list(pool.last_latency_s), sum(g.correct for g in grades)


def run_inprocess(pairs) -> tuple[float, list[float], int]:
    lat, correct = [], 0
    t0 = time.perf_counter()
    for response, gold in pairs:
        t = time.perf_counter()
        correct += grade(response, gold).correct
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, lat, correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0, help="the pool's per-response limit (s)")
    ap.add_argument("--wrong", type=int, default=300, help="responses in the `wrong` workload")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every timeout with its whole input

    work = workloads(args.wrong)
    for response, gold in [(answer("1"), "1"), (answer("x+1"), "1+x")]:
        grade(response, gold)  # the in-process baseline starts warm too
    t0 = time.perf_counter()
    pool = GradingPool(workers=args.workers, timeout_s=args.timeout)
    pool.grade_batch([(answer("1"), "1"), (answer("x+1"), "1+x")])  # started and warm
    start_s = time.perf_counter() - t0

    rows = []
    for name, pairs in work.items():
        p_wall, p_lat, p_ok = run_pool(pool, pairs)
        if name == "adversarial":
            b_wall, b_lat, b_ok = None, None, None
        else:
            b_wall, b_lat, b_ok = run_inprocess(pairs)
            assert b_ok == p_ok, f"{name}: pool and in-process disagree ({p_ok} vs {b_ok} correct)"
        rows.append((name, len(pairs), p_ok, p_wall, p_lat, b_wall, b_lat))
    pool.close()

    print(f"\nGradingPool: {args.workers} workers, {args.timeout:.1f} s limit per response; "
          f"start to first verdict {start_s:.2f} s; stats {pool.stats}")  # fmt: skip
    head = (
        f"{'workload':<12} {'n':>5} {'correct':>7} | {'pool resp/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} | {'in-proc resp/s':>14} {'p50 ms':>8} {'p99 ms':>8} | {'speedup':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, n, ok, p_wall, p_lat, b_wall, b_lat in rows:
        line = (
            f"{name:<12} {n:>5} {ok:>7} | {n / p_wall:>11.0f} {pct(p_lat, .5) * 1e3:>8.2f} "
            f"{pct(p_lat, .99) * 1e3:>8.1f} {max(p_lat) * 1e3:>8.1f} | "
        )
        if b_wall is None:
            line += f"{'unbounded':>14} {'-':>8} {'-':>8} | {'-':>7}"
        else:
            line += (
                f"{n / b_wall:>14.0f} {pct(b_lat, .5) * 1e3:>8.2f} {pct(b_lat, .99) * 1e3:>8.1f} | "
                f"{b_wall / p_wall:>6.2f}x"
            )
        print(line)
    worst = max(max(r[4]) for r in rows)
    print(f"\nworst pool latency {worst:.2f} s (limit {args.timeout:.1f} s); "
          f"{'within' if worst < args.timeout + 0.5 else 'OVER'} the limit")  # fmt: skip


if __name__ == "__main__":
    main()
