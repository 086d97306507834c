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
import os
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


def _cpu_s(pid: int) -> float:
    """User+system CPU seconds of a live process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # replaced mid-run: its CPU time is not counted
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pool(pool: GradingPool, pairs) -> tuple[float, float, list[float], int]:
    """(wall s, CPU s of the parent and the workers, per-item latencies, correct count)."""
    pids = pool.worker_pids()
    cpu0 = time.process_time() + sum(_cpu_s(p) for p in pids)
    t0 = time.perf_counter()
    grades = pool.grade_batch(pairs)
    wall = time.perf_counter() - t0
    pids = set(pids) | set(pool.worker_pids())
    cpu = time.process_time() + sum(_cpu_s(p) for p in pids) - cpu0
    return wall, cpu, list(pool.last_latency_s), sum(g.correct for g in grades)


def run_inprocess(pairs) -> tuple[float, float, list[float], int]:
    lat, correct = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    for response, gold in pairs:
        t = time.perf_counter()
        correct += grade(response, gold).correct
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, time.process_time() - c0, lat, correct


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
        pool_run = run_pool(pool, pairs)
        base_run = None
        if name != "adversarial":
            base_run = run_inprocess(pairs)
            assert base_run[3] == pool_run[3], f"{name}: pool and in-process disagree ({pool_run[3]} vs {base_run[3]})"
        rows.append((name, len(pairs), pool_run, base_run))
    pool.close()

    print(f"\nGradingPool: {args.workers} workers, {args.timeout:.1f} s limit per response; "
          f"start to first verdict {start_s:.2f} s; stats {pool.stats}")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (others' work counts)")
    cores = min(args.workers, os.cpu_count() or 1)
    head = (
        f"{'workload':<12} {'n':>5} {'ok':>5} | {'pool resp/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'cpu ms/r':>8} {'idle est':>8} | {'in-proc resp/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'cpu ms/r':>8} "
        f"{'idle est':>8} | {'wall x':>6} {'est x':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, n, (p_wall, p_cpu, p_lat, ok), base in rows:
        p_est = cores * n / max(p_cpu, 1e-9)
        line = (
            f"{name:<12} {n:>5} {ok:>5} | {n / p_wall:>11.0f} {pct(p_lat, .5) * 1e3:>7.2f} "
            f"{pct(p_lat, .99) * 1e3:>7.1f} {max(p_lat) * 1e3:>7.1f} {p_cpu / n * 1e3:>8.2f} {p_est:>8.0f} | "
        )
        if base is None:
            line += f"{'unbounded':>14} {'-':>7} {'-':>7} {'-':>8} {'-':>8} | {'-':>6} {'-':>6}"
        else:
            b_wall, b_cpu, b_lat, _ = base
            b_est = n / max(b_cpu, 1e-9)
            line += (
                f"{n / b_wall:>14.0f} {pct(b_lat, .5) * 1e3:>7.2f} {pct(b_lat, .99) * 1e3:>7.1f} "
                f"{b_cpu / n * 1e3:>8.2f} {b_est:>8.0f} | {b_wall / p_wall:>5.2f}x {p_est / b_est:>5.2f}x"
            )
        print(line)
    worst = max(max(r[2][2]) for r in rows)
    print(f"\nworst pool latency {worst:.2f} s (limit {args.timeout:.1f} s): "
          f"{'within' if worst < args.timeout + 0.5 else 'OVER'} the limit.")  # fmt: skip
    print("'wall x': in-process wall time / pool wall time, as measured (other work on the machine included).")
    print(f"'idle est': responses/s on idle cores from CPU time: pool {cores} x n / (parent+worker CPU s), "
          "in-process n / CPU s (one core); 'est x' is their ratio.")  # fmt: skip


if __name__ == "__main__":
    main()
