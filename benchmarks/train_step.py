"""Update-phase throughput: packed micro-batches vs padded micro-batches, on an AutoThink-shaped batch.

AutoThink batches mix no-think answers with think traces about ten times longer. The padded
baseline is what fixed-size micro-batching does: B sequences in arrival order, padded to the
longest. The packed path is the trainer's: `plan_examples` (first-fit decreasing) under a token budget and
`packed_logprobs` with restarting position ids; "shared" is the packed path with each
prompt computed once for its rollouts (`algorithm.share_prompts`, the trainer's default with
packed SDPA). All run the same model, the same GRPO loss (`token_loss` with the clipped
surrogate) and an AdamW step; tokens/s counts response tokens only.

    python benchmarks/train_step.py [--size small] [--prompts 16] [--rollouts 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from at_core.algorithms.losses import token_loss
from at_core.config import load_config
from at_core.attention import PACKED_SDPA
from at_core.logprob import token_logprobs
from at_core.packing import Example, pack, packed_logprobs, plan_examples
from at_core.tiny import build_random_model


ALGO = load_config(overrides=["algorithm.entropy_coef=1e-3"]).algorithm


def make_batch(prompts: int, rollouts: int, short: int, long: int, vocab: int, seed: int = 0):
    """Half no-think (about `short` tokens), half think (about `long`): a 10x spread."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(30, 45))]
        for _ in range(rollouts):
            n = rng.randint(int(long * 0.8), long) if rng.random() < 0.5 else rng.randint(short // 2, short)
            out.append(Example(prompt, [rng.randrange(10, vocab) for _ in range(n)], advantage=rng.gauss(0, 1)))
    return out


def step_packed(model, opt, rollouts, budget, share=False):
    for idx in plan_examples(rollouts, budget, share):
        batch = pack([rollouts[i] for i in idx], share_prompts=share)
        logp, ent = packed_logprobs(model, batch, 0.6, with_entropy=True)
        adv = torch.tensor([rollouts[i].advantage for i in idx])[batch.seq_of_token]
        (token_loss(logp, logp.detach(), adv, ALGO, entropy=ent)[0].sum() * 1e-3).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_padded(model, opt, rollouts, micro_size, pad_id=0):
    for s in range(0, len(rollouts), micro_size):
        group = rollouts[s : s + micro_size]
        width = max(r.length for r in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        resp = torch.zeros((len(group), width), dtype=torch.bool)
        for k, r in enumerate(group):
            seq = r.prompt_ids + r.response_ids
            ids[k, : len(seq)] = torch.tensor(seq)
            mask[k, : len(seq)] = 1
            resp[k, len(r.prompt_ids) : len(seq)] = True
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:]
        sel = resp[:, 1:]
        logp = token_logprobs(logits[sel], targets[sel], 0.6)
        lp_all = torch.log_softmax(logits[sel].float() / 0.6, -1)
        ent = -(lp_all.exp() * lp_all).sum(-1)
        adv = torch.tensor([r.advantage for r in group])[:, None].expand_as(sel)[sel]
        (token_loss(logp, logp.detach(), adv, ALGO, entropy=ent)[0].sum() * 1e-3).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="tiny model size preset (test | small | wide)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--short", type=int, default=40, help="no-think response length (tokens)")
    ap.add_argument("--long", type=int, default=400, help="think response length (tokens)")
    ap.add_argument("--micro-size", type=int, default=8, help="padded baseline: sequences per micro-batch")
    ap.add_argument("--budget", type=int, default=0, help="packed: tokens per micro-batch (0: same as padded's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = build_random_model(tempfile.mkdtemp(prefix="bench_model_"), size=args.size)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rollouts = make_batch(args.prompts, args.rollouts, args.short, args.long, model.config.vocab_size)
    tokens = sum(len(r.response_ids) for r in rollouts)
    budget = args.budget or args.micro_size * (args.long + 45)  # the padded micro-batch's worst-case footprint
    runs = {"padded": lambda: step_padded(model, opt, rollouts, args.micro_size),
            "packed": lambda: step_packed(model, opt, rollouts, budget),
            "shared": lambda: step_packed(model, opt, rollouts, budget, share=True)}
    for fn in runs.values():  # warm up
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    lens = sorted(len(r.response_ids) for r in rollouts)
    prompt_tokens = sum(len(r.prompt_ids) for r in rollouts)
    print(f"batch: {len(rollouts)} rollouts, response tokens {tokens} (min {lens[0]}, median {lens[len(lens) // 2]}, "
          f"max {lens[-1]}), prompt tokens {prompt_tokens} ({prompt_tokens // args.rollouts} distinct), model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{torch.get_num_threads()} threads")
    print(f"{'path':<8} {'median s/step (range)':>24} {'tokens/s':>10} {'vs padded':>10} {'vs packed':>10}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, ts in times.items():
        print(f"{name:<8} {med[name]:9.3f} ({min(ts):.3f}-{max(ts):.3f}) {tokens / med[name]:10.0f} "
              f"{med['padded'] / med[name]:9.2f}x {med['packed'] / med[name]:9.2f}x")


if __name__ == "__main__":
    main()
