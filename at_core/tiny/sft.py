"""Distil the teacher into a tiny R1-style base model: the starting point of AutoThink's RL.

What the base must be, and why the SFT mixture looks the way it does:

- standard prompt (`<think>\\n`): always the think trace, so the standard prompt is the
  "always think" baseline and thinking is accurate on every tier;
- ellipsis prompt (`<think>\\n...\\n`): half the targets close the block at once and half
  think, alternating within every tier, so the base picks a mode at random, independent
  of difficulty: exactly the R1 behaviour AutoThink starts from;
- forced no-think prompt (`...\\n</think>\\n\\n`): the bare answer on easy and medium
  problems, so the no-think baseline exists and the one-shot answer is trained where it
  can be learnt (the addition and multiplication tables). Hard products cannot be
  computed in one shot, and the forced prompt followed by an answer is token for token an
  ellipsis no-think example, so hard problems get no forced examples of their own: their
  one-shot guesses would only spend the budget (see `roles`).

Loss on response tokens only. Examples are packed into rows of `row_tokens`, so padding
stays small. Deterministic given the seed and the number of threads.

    python -m at_core.tiny.sft --out runs/tiny_base [--quick] [--eval 300]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from at_core.data import Problem
from at_core.prompts import USER_SUFFIX, render_prompt
from at_core.tiny import teacher
from at_core.tiny.task import TIERS, generate

MARKER = "tiny_world.json"  # written last: its presence means the directory is complete
# (prompt style, mode) of the SFT examples, cycled within every tier: the ellipsis prompt
# gets one think and one no-think target per cycle, whatever the difficulty.
ROLES = (("standard", "think"), ("ellipsis", "think"), ("ellipsis", "no_think"), ("no_think", "no_think"))
ONE_SHOT_TIERS = ("easy", "medium")  # tiers whose answer a one-shot model can learn


def roles(tier: str) -> tuple[tuple[str, str], ...]:
    """The role cycle of a tier: every role where the one-shot answer is learnable, else
    all but the forced no-think one (its sequences are the ellipsis no-think ones)."""
    return ROLES if tier in ONE_SHOT_TIERS else ROLES[:3]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the base model; recorded in the model directory."""

    size: str = "small"  # a `model.SIZES` preset
    vocab_size: int = 512
    problems_per_tier: int = 6500  # easy and medium problems each; one SFT example per problem, roles cycled
    hard_weight: int = 3  # hard problems per easy one: the long trace is what takes learning
    row_tokens: int = 256  # examples are packed into rows of this many tokens
    max_batch_tokens: int = 1024  # tokens (rows x row_tokens) per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.02
    decay_fraction: float = 0.25
    warmup_steps: int = 30
    weight_decay: float = 0.05
    paired_fraction: float = 0.25  # the problems trained last, whose ellipsis examples pair by mode (`training_rows`)
    seed: int = 0


QUICK = {"size": "test", "problems_per_tier": 240, "hard_weight": 2, "max_batch_tokens": 2048, "warmup_steps": 5}


def sft_problems(recipe: "Recipe") -> list[Problem]:
    """Training problems, interleaved; hard ones `hard_weight` times as many."""
    counts = {"easy": 1, "medium": 1, "hard": recipe.hard_weight}
    per_tier = {t: generate(t, recipe.problems_per_tier * counts[t], seed=recipe.seed) for t in TIERS}
    rounds = [[p for t in TIERS for p in per_tier[t][k * counts[t] : (k + 1) * counts[t]]]
              for k in range(recipe.problems_per_tier)]
    return [p for group in rounds for p in group]


def response_text(problem: Problem, mode: str, style: str) -> str:
    if mode == "think":
        return teacher.think_response(problem)
    return teacher.forced_no_think_response(problem) if style == "no_think" else teacher.no_think_response(problem)


def tokenizer_corpus(problems: list[Problem]) -> list[str]:
    """Texts that fix the BPE: problems with the user suffix, and both response modes."""
    texts = [p.problem + USER_SUFFIX for p in problems]
    texts += [teacher.think_response(p) for p in problems] + [teacher.no_think_response(p) for p in problems]
    return texts + ["...\n"]


def assign_roles(problems: list[Problem]) -> list[tuple[str, str]]:
    """(prompt style, mode) of each problem's example: `roles(tier)` cycled within each tier."""
    seen = {t: 0 for t in TIERS}
    out = []
    for p in problems:
        cycle = roles(p.tier)
        out.append(cycle[seen[p.tier] % len(cycle)])
        seen[p.tier] += 1
    return out


def sft_examples(problems: list[Problem], tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example; roles cycled within each tier."""
    prompts, responses = [], []
    for p, (style, mode) in zip(problems, assign_roles(problems)):
        prompts.append(render_prompt(tokenizer, p.problem, style))
        responses.append(response_text(p, mode, style))
    enc_p = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    enc_r = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + r + [eos], len(p)) for p, r in zip(enc_p, enc_r)]


def mode_pairs(problems: list[Problem], start: int = 0) -> list[list[int]]:
    """Example indexes (from `start` on) grouped into units that share a packed row: each
    ellipsis-prompt think example with an ellipsis no-think example of the same tier; every
    other example alone.

    The ellipsis prompt's mode is one token, whose probability follows the batches trained
    last. Packed at random, a tier's think and no-think examples fall unevenly into those
    batches, and the bases' sampled think rate on a tier ended anywhere in 0.28-0.65 over
    seeds. In pairs, every step pulls each tier's choice back toward even odds.
    """
    waiting: dict[tuple[str, str], list[int]] = {}
    units: list[list[int]] = []
    for i, (p, (style, mode)) in enumerate(zip(problems, assign_roles(problems))):
        if i < start:
            continue
        if style != "ellipsis":
            units.append([i])
            continue
        partners = waiting.setdefault((p.tier, "no_think" if mode == "think" else "think"), [])
        if partners:
            units.append([partners.pop(0), i])
        else:
            waiting.setdefault((p.tier, mode), []).append(i)
    units += [[i] for rest in waiting.values() for i in rest]  # an odd one out per tier, at most
    return units


def training_rows(problems: list[Problem], examples, recipe: "Recipe") -> list[list[int]]:
    """The packed rows in training order: the examples of the last `paired_fraction` of the
    problems, trained as the learning rate decays, come last and in `mode_pairs`.

    Pairs leave more of a row empty (the whole run in pairs took 20% more steps), and the
    mode choice the base ends with is set by the batches trained last, so only those pair.
    """
    rng = random.Random(f"tiny-sft-batches:{recipe.seed}")
    cut = round(len(problems) * (1 - recipe.paired_fraction))
    head = pack_rows(examples, recipe.row_tokens, rng, [[i] for i in range(cut)])
    return head + pack_rows(examples, recipe.row_tokens, rng, mode_pairs(problems, cut))


def pack_rows(examples, row_tokens: int, rng: random.Random, units: Optional[list[list[int]]] = None) -> list[list[int]]:
    """Examples (by index) packed into rows of at most `row_tokens`, in random order; the
    examples of one of `units` (default: each example alone) go into the same row.

    Packing mixes think and no-think examples in every batch. Length buckets would put
    each mode in batches of its own, and the last few batches before the end of the
    schedule would then tilt the ellipsis prompt's mode choice.
    """
    order = [list(u) for u in units] if units is not None else [[i] for i in range(len(examples))]
    rng.shuffle(order)
    rows: list[list[int]] = []
    free: list[int] = []
    for unit in order:
        n = sum(len(examples[i][0]) for i in unit)
        if n > row_tokens:
            raise ValueError(f"SFT examples {unit} have {n} tokens together, more than row_tokens={row_tokens}")
        for r in range(max(0, len(rows) - 16), len(rows)):  # first fit among the newest rows
            if free[r] >= n:
                rows[r].extend(unit)
                free[r] -= n
                break
        else:
            rows.append(list(unit))
            free.append(row_tokens - n)
    rng.shuffle(rows)
    return rows


def collate(examples, rows: list[list[int]], pad_id: int):
    """Packed rows: position ids restart at every example, which (with no attention mask)
    makes transformers attend within each example only; the padded tail is never attended
    to by real tokens (it comes last) and carries no labels."""
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            seq, n_prompt = examples[i]
            ids[r, at : at + len(seq)] = torch.tensor(seq)
            labels[r, at + n_prompt : at + len(seq)] = torch.tensor(seq[n_prompt:])
            positions[r, at : at + len(seq)] = torch.arange(len(seq))
            at += len(seq)
        positions[r, at:] = torch.arange(width - at) + (len(examples[row[-1]][0]) if row else 0)
    return ids, labels, positions


def _lr_at(step: int, total: int, recipe: Recipe) -> float:
    """Warmup, a constant stretch, then a linear decay over the last `decay_fraction`:
    the skills here (copying digits, carries) arrive late and abruptly, and a schedule
    that stays high longer reaches them with fewer tokens than a cosine one."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    decay_start = int(total * (1 - recipe.decay_fraction))
    if step < decay_start:
        return recipe.lr
    progress = (step - decay_start) / max(1, total - decay_start)
    return recipe.lr * (1 - (1 - recipe.min_lr_ratio) * progress)


def train(model, examples, rows: list[list[int]], recipe: Recipe, pad_id: int, progress: bool = True) -> list[float]:
    """One pass over `examples`, packed in `rows` (see `training_rows`); returns the loss of
    every step (mean over response tokens)."""
    per_step = max(1, recipe.max_batch_tokens // recipe.row_tokens)
    batches = [rows[k : k + per_step] for k in range(0, len(rows), per_step)]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    # Batches differ in how many response tokens they hold; a per-batch mean would weigh
    # tokens unequally (and skew the ellipsis prompt's mode choice). Normalise by a
    # data-wide constant instead.
    per_batch = sum(len(seq) - n_prompt for seq, n_prompt in examples) / len(batches)
    model.train()
    losses = []
    bar = tqdm(batches, desc="tiny SFT", disable=not progress, mininterval=2.0)
    for step, idx in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, len(batches), recipe)
        ids, labels, positions = collate(examples, idx, pad_id)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
        loss = token_loss / per_batch  # every token weighs the same, whatever its batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(token_loss.item() / max(1, int((labels[:, 1:] != -100).sum())))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def build_base(out_dir: str | Path, quick: bool = False, seed: int = 0, force: bool = False, progress: bool = True,
               threads: Optional[int] = None, **overrides) -> Path:
    """Build the tiny R1-style base model in `out_dir` (an HF directory) and return its path.

    A directory already holding a base built from the same recipe is reused unless `force`.
    `quick` is a seconds-long build of a small model for tests; `overrides` set `Recipe` fields.
    """
    from at_core.tiny.model import save_model, tiny_config
    from at_core.tiny.tokenizer import build_tokenizer
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    fields = {"seed": seed, **(QUICK if quick else {})}
    unknown = set(overrides) - set(Recipe.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown recipe fields {sorted(unknown)}; valid: {sorted(Recipe.__dataclass_fields__)}")
    recipe = Recipe(**{**fields, **overrides})
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists() and not force:
        if json.loads(marker.read_text()).get("recipe") == asdict(recipe):
            return out
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    started, cpu_started = time.time(), time.process_time()

    problems = sft_problems(recipe)
    out.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        marker.unlink()
    build_tokenizer(out, tokenizer_corpus(problems[:3000]), vocab_size=recipe.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    examples = sft_examples(problems, tokenizer)

    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(tiny_config(tokenizer, recipe.size))
    rows = training_rows(problems, examples, recipe)
    losses = train(model, examples, rows, recipe, tokenizer.pad_token_id, progress=progress)
    save_model(model, tokenizer, out)
    record = {
        "recipe": asdict(recipe),
        "examples": len(examples),
        "tokens": sum(len(e[0]) for e in examples),
        "steps": len(losses),
        "loss_first": sum(losses[:10]) / max(1, len(losses[:10])),
        "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "seconds": round(time.time() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "threads": torch.get_num_threads(),
        "losses": [round(x, 4) for x in losses],
    }
    marker.write_text(json.dumps(record, indent=1))
    return out


# ---------------------------------------------------------------- measuring the base


def _summary(rows: list[tuple[bool, bool, int]]) -> dict:
    n = max(1, len(rows))
    return {
        "count": len(rows),
        "accuracy": sum(r[1] for r in rows) / n,
        "think_rate": sum(r[0] for r in rows) / n,
        "mean_tokens": sum(r[2] for r in rows) / n,
    }


def adaptive_projection(standard: dict, ellipsis: dict, think_tiers=("hard",)) -> dict:
    """What a policy that thinks exactly on `think_tiers` would score, from the base's
    ellipsis-prompt behaviour in each mode, relative to the standard prompt: the target
    AutoThink's RL should approach (accuracy gap and token ratio)."""
    acc = tok = 0.0
    for tier in TIERS:
        mode = ellipsis[tier]["by_mode"]["think" if tier in think_tiers else "no_think"]
        acc += mode["accuracy"] / len(TIERS)
        tok += mode["mean_tokens"] / len(TIERS)
    return {"accuracy": acc, "mean_tokens": tok, "accuracy_minus_standard": acc - standard["mean_accuracy"],
            "token_ratio": tok / standard["mean_tokens"]}


def evaluate_base(model_dir: str | Path, n_per_tier: int = 300, style: str = "standard", temperature: float = 0.6,
                  top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 200, batch_size: int = 150,
                  split: str = "test") -> dict:
    """Accuracy, think rate and mean response tokens per tier on held-out problems.

    Samples with `at_rollout.server.generator.Generator` (the rollout engine), grades with
    `at_reward.math.grade` the text after the prompt's `<think>\\n` (so the forced prompt's
    `</think>` counts) and tells modes with `at_reward.autothink.detect_mode`. Tokens count
    the whole completion, end-of-sequence included. `temperature=0` is greedy decoding.
    """
    from at_core.prompts import STYLE_SUFFIX
    from at_reward.autothink import detect_mode
    from at_reward.math import grade
    from at_rollout.server.generator import Generator, SamplingParams

    gen = Generator.from_pretrained(model_dir, dtype="float32", device="cpu", max_batch_rows=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, sampling_seed=seed)
    result = {"style": style, "temperature": temperature, "top_p": top_p, "n_per_tier": n_per_tier}
    for tier in TIERS:
        problems = generate(tier, n_per_tier, seed=seed, split=split)
        prompts = [gen.tokenizer(render_prompt(gen.tokenizer, p.problem, style), add_special_tokens=False)["input_ids"]
                   for p in problems]
        rows = []  # (think, correct, tokens)
        for p, sample in zip(problems, gen.generate(prompts, params)):
            think = style != "no_think" and detect_mode(sample.text) == "think"
            rows.append((think, grade(STYLE_SUFFIX[style] + sample.text, p.answer).correct, len(sample.output_ids)))
        result[tier] = _summary(rows)
        result[tier]["by_mode"] = {
            mode: _summary([r for r in rows if r[0] == (mode == "think")]) for mode in ("think", "no_think")
        }
    for key, name in (("accuracy", "mean_accuracy"), ("think_rate", "mean_think_rate"), ("mean_tokens", "mean_tokens")):
        result[name] = sum(result[t][key] for t in TIERS) / len(TIERS)  # the mean over tiers
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny R1-style base model (SFT from the teacher).")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--size", default=None, help="model size preset (default: the recipe's, `small`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small model in seconds (tests)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds this recipe")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--eval", type=int, default=0, metavar="N", help="then measure on N held-out problems per tier")
    args = parser.parse_args(argv)
    out = build_base(args.out, quick=args.quick, seed=args.seed, force=args.force, threads=args.threads,
                     **({"size": args.size} if args.size else {}))
    record = json.loads((out / MARKER).read_text())
    print(f"built {out}: {record['steps']} steps, {record['tokens']} tokens, {record['seconds']} s, "
          f"{record['cpu_seconds']} cpu-s, loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}")
    if args.eval:
        results = {}
        for style, temperature in (("standard", 0.6), ("no_think", 0.6), ("ellipsis", 0.6), ("standard", 0.0),
                                   ("no_think", 0.0)):
            r = results[style, temperature] = evaluate_base(out, args.eval, style, temperature)
            cells = "  ".join(f"{t}: acc {r[t]['accuracy']:.3f} think {r[t]['think_rate']:.2f} "
                              f"tok {r[t]['mean_tokens']:.1f}" for t in TIERS)
            print(f"{style:9s} T={temperature}: {cells}", flush=True)
            if style == "ellipsis":
                for mode in ("think", "no_think"):
                    print(f"  ellipsis, {mode:8s}: " + "  ".join(
                        f"{t}: acc {r[t]['by_mode'][mode]['accuracy']:.3f} n {r[t]['by_mode'][mode]['count']} "
                        f"tok {r[t]['by_mode'][mode]['mean_tokens']:.1f}" for t in TIERS))
                proj = adaptive_projection(results["standard", 0.6], r)
                print(f"  think-on-hard-only projection: accuracy {proj['accuracy']:.3f} "
                      f"({proj['accuracy_minus_standard']:+.3f} vs standard), token ratio {proj['token_ratio']:.2f}")


if __name__ == "__main__":
    main()
