"""Step time of per-group dispatch against the static even split, on our own server processes.

    python benchmarks/dispatch.py [--engines 2] [--groups 32] [--n 4] [--short 8] [--cap 96] [--long 4]

A skewed step: most groups' responses are short (`--short` tokens), `--long` groups run to
the cap (`--cap`); `ignore_eos` makes every length exact, so both ways do the same work. The
long groups sit at random places (one layout per `--layouts` seed). Timed, per layout:

- static: the old way, one request per engine holding every k-th prompt group;
- dispatch(auto): `at_rollout.dispatch.Dispatcher` as the trainer builds it for our server
  (groups_per_request=0: each engine's share in one request, to the least-loaded engine);
- dispatch(all): one group per request, every group in flight at once;
- dispatch(M): one group per request, at most M groups in flight per engine (what SGLang gets).

Prints one table of median seconds and ratios (dispatch / static; below 1 is faster).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def static_split(clients, prompts, params):
    """One request per engine with every k-th group (the split RolloutWorkers used before)."""
    k = len(clients)
    shards = [list(range(i, len(prompts), k)) for i in range(k)]
    with ThreadPoolExecutor(max_workers=k) as pool:
        futs = [pool.submit(c.generate, [prompts[g] for g in idx], [params[g] for g in idx], True, 10**6)
                for c, idx in zip(clients, shards)]
        return [f.result() for f in futs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", help="tiny model size: test | small | wide")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--long", type=int, default=4, help="groups whose responses run to the cap")
    ap.add_argument("--in-flight", type=int, nargs="*", default=[4, 1], help="dispatch(M) variants")
    ap.add_argument("--layouts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode and layout (median; modes interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    args = ap.parse_args()

    import os

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the servers
    from at_core.tiny import build_random_model
    from at_rollout.dispatch import Dispatcher
    from at_rollout.backends.own_server import LocalServer

    model_dir = build_random_model(Path(tempfile.mkdtemp(prefix="bench_dispatch_")) / "model", size=args.size)
    servers = [LocalServer(model_dir, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).start()
               for _ in range(args.engines)]
    try:
        clients = [s.client(timeout_s=3600) for s in servers]
        rng = random.Random(0)
        prompts = [[1] + [rng.randrange(3, 60) for _ in range(rng.randrange(4, 12))] for _ in range(args.groups)]
        base = {"temperature": 1.0, "top_p": 1.0, "n": args.n, "ignore_eos": True, "sampling_seed": 7}
        Dispatcher(clients).generate(prompts[:2], {**base, "max_new_tokens": 4})  # warm up every engine
        modes = ["static", "dispatch(auto)", "dispatch(all)"] + [f"dispatch({m})" for m in args.in_flight]
        caps = {"dispatch(auto)": 32, "dispatch(all)": -(-args.groups // args.engines),
                **{f"dispatch({m})": m for m in args.in_flight}}
        rows = []
        for layout in range(args.layouts):
            long = set(random.Random(100 + layout).sample(range(args.groups), args.long))
            params = [{**base, "max_new_tokens": args.cap if g in long else args.short} for g in range(args.groups)]
            runs = {m: [] for m in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    start = time.perf_counter()
                    if mode == "static":
                        static_split(clients, prompts, params)
                    else:
                        Dispatcher(clients, max_in_flight_groups=caps[mode],
                                   groups_per_request=0 if mode == "dispatch(auto)" else 1).generate(prompts, params)
                    runs[mode].append(time.perf_counter() - start)
            times = {m: statistics.median(v) for m, v in runs.items()}
            per_engine = [sum(1 for g in long if g % args.engines == e) for e in range(args.engines)]
            rows.append((layout, per_engine, times))
        print(f"{args.engines} engines, {args.groups} groups x {args.n} samples, {args.groups - args.long} groups of "
              f"{args.short} tokens and {args.long} of {args.cap}; model size {args.size}, {args.threads} thread(s) "
              "per server")
        head = f"{'layout':<8}{'long per engine (static)':<26}" + "".join(f"{m + ' s':>18}" for m in modes) + \
            "".join(f"{m.replace('dispatch', 'ratio'):>12}" for m in modes[1:])
        print(head)
        print("-" * len(head))
        for layout, per_engine, t in rows:
            print(f"{layout:<8}{str(per_engine):<26}" + "".join(f"{t[m]:>18.2f}" for m in modes)
                  + "".join(f"{t[m] / t['static']:>12.2f}" for m in modes[1:]))
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
