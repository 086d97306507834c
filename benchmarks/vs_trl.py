"""Our RL step against TRL's GRPOTrainer on the tiny world's workload, side by side in one run.

    pip install -e ".[bench]"          # TRL: a benchmark-only extra, never a runtime dependency
    python benchmarks/vs_trl.py --base runs/tiny/base [--steps 5] [--rounds 1] [--threads 2]

The workload (both sides): the same SFT base (`at_core.tiny.sft`), 32 prompts x 8 rollouts
per step with the ellipsis prompt, at most 160 new tokens, temperature 0.6 (top_p 1), the
plain AutoThink reward (`at_reward.autothink.base_reward` over `at_reward.math.grade`), no KL
(beta 0, no reference model), one optimizer update per batch (on-policy, no extra epochs),
AdamW at lr 2e-4, gradient clipping 1.0, fp32, no gradient checkpointing (TRL's default is
on: `--trl-gradient-checkpointing` measures TRL as shipped), `--threads` torch
threads per process. TRL is configured for the same batch: per_device_train_batch_size=256
completions (= 32 prompts x num_generations 8), steps_per_generation=1, num_iterations=1,
use_vllm=False, use_cpu=True, loss_type "dapo" (token mean over the batch, as ours).

Ours runs the real path: `python -m at_core.train` with DeepSpeed (the main job's config: ZeRO-0
in one process), the rollout server process and a weight sync every step. Each side runs in a fresh process; with --rounds > 1 they
alternate (ours, TRL, ours, ...) so drift on a shared machine hits both. The first
`--warmup` steps of every run are excluded. Reported: seconds per step, generated tokens per
second (generated tokens / step time), and our breakdown (rollout, reward, update, sync).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, ROLLOUTS, MAX_NEW, TEMPERATURE, LR = 32, 8, 160, 0.6, 2.0e-4


# ------------------------------------------------------------------------------ ours


def run_ours(args, out: Path) -> list[dict]:
    """The real trainer for `steps` steps of one plain stage; per-step rows from metrics.jsonl."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "examples" / "configs" / "tiny_r1.yaml")
    # One plain stage: the schema's stages 1-2 are skipped (start_stage), stage 3 without shaping.
    cfg.stage = {"3": {"steps": args.steps, "prompts_per_step": PROMPTS, "rollouts_per_prompt": ROLLOUTS,
                       "max_response_len": MAX_NEW, "temperature": TEMPERATURE, "top_p": 1.0,
                       "prompt_style": "ellipsis", "lr": LR,
                       "shaping": {"balance_target": None, "length_alpha": 0.0, "length_beta": 0.0}}}
    cfg.start_stage = 3
    cfg.save_every = 10**6
    cfg.seed = args.seed
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.ours_override))
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "vs_trl.yaml"
    OmegaConf.save(cfg, cfg_path)
    env = _env(args)
    cmd = [sys.executable, "-m", "at_core.train", "--config", str(cfg_path), "--model-path", str(args.base),
           "--out", str(out / "run")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"ours failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "time/train" in r]
    out_rows = []
    for r in rows:
        step = sum(r[f"time/{k}"] for k in ("rollout", "reward", "train", "sync"))
        out_rows.append({"step_s": step, "tokens": r["tokens_per_s"] * step, "rollout": r["time/rollout"],
                         "reward": r["time/reward"], "update": r["time/train"], "sync": r["time/sync"]})
    return out_rows


# ------------------------------------------------------------------------------ TRL


def trl_child(args) -> None:
    """One TRL GRPOTrainer run; prints one JSON line of per-step rows."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from at_core.prompts import render_prompt
    from at_core.tiny.task import generate_all
    from at_reward.autothink import base_reward, detect_mode
    from at_reward.math import grade

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.base)
    problems = generate_all(2000, seed=args.seed, split="train")[: PROMPTS * args.steps]
    data = Dataset.from_list([{"prompt": render_prompt(tok, p.problem, "ellipsis"), "answer": str(p.answer)}
                              for p in problems])

    def autothink_reward(prompts, completions, answer, **_):
        out = []
        for text, gold in zip(completions, answer):
            g = grade(text, gold)
            out.append(base_reward(detect_mode(text) == "think", g.correct, g.format_ok))
        return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.rows, self.t0, self.logs = [], None, []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.rows.append({"step_s": time.perf_counter() - self.t0})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.logs.append(logs)

    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), num_generations=ROLLOUTS, max_completion_length=MAX_NEW,
        temperature=TEMPERATURE, top_p=1.0, per_device_train_batch_size=PROMPTS * ROLLOUTS,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, beta=0.0, use_vllm=False,
        use_cpu=True, bf16=False, gradient_checkpointing=args.trl_gradient_checkpointing, learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0, loss_type="dapo", max_steps=args.steps, logging_steps=1, report_to="none",
        save_strategy="no", shuffle_dataset=False, disable_dropout=True, seed=args.seed, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=autothink_reward, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    for row, log in zip(clock.rows, clock.logs):
        row["tokens"] = log["completions/mean_length"] * PROMPTS * ROLLOUTS
    print(json.dumps(clock.rows))


def run_trl(args, out: Path) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--base", str(args.base), "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(out)]
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    proc = subprocess.run(cmd, env=_env(args), cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"TRL failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report


def _env(args) -> dict:
    threads = str(args.threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TOKENIZERS_PARALLELISM": "false"}


def _steps(rows: list[dict]) -> str:
    return " ".join(f"{r['step_s']:.2f}" for r in rows)


def _spread(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def report(ours: list[dict], trl: list[dict]) -> list[str]:
    def tps(rows):
        return [r["tokens"] / r["step_s"] for r in rows]

    o_s, t_s = [r["step_s"] for r in ours], [r["step_s"] for r in trl]
    lines = ["| | ours | TRL GRPOTrainer | ours / TRL |", "|---|---|---|---|"]
    lines.append(f"| seconds per step, median (range) | {_spread(o_s)} | {_spread(t_s)} | "
                 f"{statistics.median(t_s) / statistics.median(o_s):.2f}x faster |")
    lines.append(f"| generated tokens / s | {_spread(tps(ours), 0)} | {_spread(tps(trl), 0)} | "
                 f"{statistics.median(tps(ours)) / statistics.median(tps(trl)):.2f}x |")
    lines.append(f"| generated tokens per step | {statistics.median([r['tokens'] for r in ours]):.0f} | "
                 f"{statistics.median([r['tokens'] for r in trl]):.0f} | |")
    lines += ["", "| ours: phase | seconds per step, median (range) | share |", "|---|---|---|"]
    total = statistics.median(o_s)
    for k in ("rollout", "reward", "update", "sync"):
        xs = [r[k] for r in ours]
        lines.append(f"| {k} | {_spread(xs)} | {100 * statistics.median(xs) / total:.0f}% |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the tiny SFT base (at_core.tiny.sft --out DIR)")
    p.add_argument("--steps", type=int, default=5, help="RL steps per run")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run left out")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both")
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for our side (e.g. deepspeed.zero_stage=3)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL as shipped (GRPOConfig's default is on; ours never checkpoints the tiny model)")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-step rows here")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.base / "config.json").is_file():
        p.error(f"--base {args.base}: not an HF model directory (build one: python -m at_core.tiny.sft --out DIR)")
    if args.child:
        return trl_child(args)
    work = args.out or Path(tempfile.mkdtemp(prefix="vs_trl_"))
    ours, trl = [], []
    for k in range(args.rounds):
        if args.only in ("both", "ours"):
            rows = run_ours(args, work / f"ours{k}")[args.warmup:]
            ours += rows
            print(f"round {k}: ours  {_steps(rows)} s/step", flush=True)
        if args.only in ("both", "trl"):
            rows = run_trl(args, work / f"trl{k}")[args.warmup:]
            trl += rows
            print(f"round {k}: TRL   {_steps(rows)} s/step", flush=True)
    import torch
    import trl as trl_pkg

    print(f"\n# {PROMPTS} prompts x {ROLLOUTS} rollouts, <= {MAX_NEW} new tokens, T={TEMPERATURE}, "
          f"{args.threads} threads, {args.steps - args.warmup} timed steps x {args.rounds} round(s); "
          f"torch {torch.__version__}, TRL {trl_pkg.__version__}\n")
    if ours and trl:
        print("\n".join(report(ours, trl)))
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "trl": trl}, indent=1))


if __name__ == "__main__":
    main()
