"""Rollout server throughput against the same Generator called in-process.

    python benchmarks/rollout.py [--size wide] [--prompts 64] [--n 8] [--max-new-tokens 64]

The workload is the tiny CPU demo's: many short samples of the tiny R1-style model. Both
sides sample the same requests with the same seeds (so they generate the same tokens);
the server is timed end to end through the client (HTTP, JSON, scheduling), once as one
batched request (the trainer's pattern) and once as 8 concurrent requests (merged into one
batch by the server). Target: server tokens/s >= 0.8 x in-process tokens/s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="wide", help="tiny model size: test | small | wide")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (here and in the server); 1 avoids oversubscribing a busy box")
    args = ap.parse_args()

    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    from at_core.prompts import render_prompt
    from at_core.tiny import build_random_model
    from at_rollout.server.generator import Generator, SamplingParams
    from at_rollout.backends.own_server import LocalServer

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_dir = build_random_model(tmp / "model", size=args.size)
    gen = Generator.from_pretrained(model_dir)
    tok = gen.tokenizer
    prompts = [tok.encode(render_prompt(tok, f"What is {i} + {3 * i + 7}?", "ellipsis")) for i in range(args.prompts)]
    sp = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 0.95, "n": args.n, "sampling_seed": 1}
    print(f"model: tiny '{args.size}' ({sum(p.numel() for p in gen.model.parameters()) / 1e6:.1f}M params); "
          f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}; median of {args.repeats}; "
          f"{args.threads} torch thread(s) per process",
          flush=True)

    params = SamplingParams(**sp)

    def local():
        return sum(len(s.output_ids) for s in gen.generate(prompts, params))

    with LocalServer(model_dir, log_file=tmp / "server.log") as server:
        client = server.client(timeout_s=600)

        def one_request():
            return sum(len(c.output_ids) for c in client.generate(prompts, sp))

        def concurrent(parts: int = 8):
            out = [0] * parts
            chunk = -(-len(prompts) // parts)

            def run(i):
                out[i] = sum(len(c.output_ids) for c in client.generate(prompts[i * chunk:(i + 1) * chunk], sp))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(parts)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return sum(out)

        cases = [("in-process Generator.generate", local), ("server, one batched request", one_request),
                 ("server, 8 concurrent requests", concurrent)]
        for _, fn in cases:
            fn()  # warm-up
        # Interleaved rounds, so a change in machine load hits every case alike.
        runs = {name: [] for name, _ in cases}
        for _ in range(args.repeats):
            for name, fn in cases:
                t = time.perf_counter()
                tokens = fn()
                runs[name].append((time.perf_counter() - t, tokens))
    rows = [(name, statistics.median(r[0] for r in rs), rs[0][1]) for name, rs in runs.items()]
    t_local, tok_local = rows[0][1], rows[0][2]

    print("\n| how | seconds | tokens | tokens/s | vs in-process |")
    print("|---|---|---|---|---|")
    for name, secs, tokens in rows:
        print(f"| {name} | {secs:.2f} | {tokens} | {tokens / secs:.0f} | {(tokens / secs) / (tok_local / t_local):.2f} |")


if __name__ == "__main__":
    main()
