"""One policy-update step of DeepSeek-R1-Distill-Qwen-1.5B on one GPU, against the planner's prediction.

The 1.5B recipe (examples/configs/r1_1p5b.yaml: bf16, ZeRO-3, gradient checkpointing,
packed micro-batches of `algorithm.micro_batch_tokens`) with random weights built from the
architecture config alone, trained through the project's own path (`deepspeed_config`,
`PackedPolicy`, `update_policy`) on synthetic rollouts that fill whole micro-batches.
The baseline is `at_core.plan.plan` for the same config on 1 GPU, stage 1: its train and
optimizer-step phases (the rollout phase needs SGLang and is not measured here; the
planner's allowance for an idle colocated SGLang is taken out).

Measured: peak memory (`torch.cuda.max_memory_allocated`, and `max_memory_reserved` plus the
planner's runtime allowance, the closer match to nvidia-smi), step time, tokens/s and
MFU = 6 x params x tokens / step time / peak bf16 FLOP/s (6N per token: forward and
backward, no attention FLOPs, no checkpointing recompute, so it understates the work).

    python benchmarks/r1_1p5b_gpu_step.py [--model-config PATH] [--sequences 8] [--seq-len 8192]
        [--steps 3] [--peak-tflops 989] [key.sub=value ...]

Without a CUDA GPU it prints the prediction and exits 2.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from at_core.config import load_config  # noqa: E402
from at_core.plan import GIB, SGLANG_RELEASED_GIB, TRAINER_RUNTIME_GIB, Arch, plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "examples" / "configs" / "models" / "r1-distill-qwen-1.5b.json"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def prediction(cfg, arch: Arch, gpu_mem_gb: float) -> dict:
    """The planner's per-GPU numbers for one GPU, less the idle SGLang this benchmark does not run."""
    r = plan(cfg, arch, 1, gpu_mem_gb, 1, "1")
    gb = r["per_gpu_gb"]
    idle = SGLANG_RELEASED_GIB if cfg.rollout.colocate else 0.0
    train, step = gb["train_phase"] - idle, gb["step_phase"] - idle
    return {"train_gb": train, "step_gb": step, "peak_gb": max(train, step),
            "peak_allocated_gb": max(train, step) - TRAINER_RUNTIME_GIB,
            "micro_batch_tokens": r["micro_batch_tokens"], "budget_gb": r["budget_gb"]}


def _rollouts(n: int, seq_len: int, prompt_len: int, vocab: int, seed: int = 0):
    from at_core.packing import Example

    rng = random.Random(seed)
    return [Example([rng.randrange(vocab) for _ in range(prompt_len)],
                    [rng.randrange(vocab) for _ in range(seq_len - prompt_len)], advantage=rng.gauss(0, 1))
            for _ in range(n)]


def measure(cfg, model_config: Path, sequences: int, seq_len: int, steps: int) -> dict:
    """Build the ZeRO-3 engine on this GPU, run one warm-up and `steps` timed update steps."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from at_core.actor import update_policy
    from at_core.engines import deepspeed_config, init_distributed
    from at_core.meta import load_model_config
    from at_core.packing import PackedPolicy

    init_distributed()
    ds_config = deepspeed_config(cfg)
    keep_alive = HfDeepSpeedConfig(ds_config)  # from_config then builds under zero.Init: partitioned at birth
    mc = load_model_config(model_config)
    lm = AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16, attn_implementation=cfg.model.attn_implementation)
    del keep_alive
    lm.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PackedPolicy(lm)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    rollouts = _rollouts(sequences, seq_len, min(cfg.max_prompt_len, seq_len // 2), mc.vocab_size)
    tokens = sum(r.length for r in rollouts)
    temperature = cfg.stage["1"].temperature
    update_policy(engine, rollouts, cfg.algorithm, temperature)  # warm-up: allocator, kernels, optimizer states
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        update_policy(engine, rollouts, cfg.algorithm, temperature)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "step_s": sorted(times)[len(times) // 2], "peak_allocated_gb":
            torch.cuda.max_memory_allocated() / GIB, "peak_reserved_gb": torch.cuda.max_memory_reserved() / GIB,
            "device": torch.cuda.get_device_name(0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", type=Path, default=DEFAULT_MODEL, help="1.5B config.json (or its directory)")
    ap.add_argument("--sequences", type=int, default=8, help="sequences per step (8 x 8192 = two 32768-token micro-batches)")
    ap.add_argument("--seq-len", type=int, default=8192, help="prompt + response tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported), after one warm-up")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory for the plan when no GPU is present")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides on top of r1_1p5b.yaml")
    args = ap.parse_args(argv)
    cfg = load_config(str(ROOT / "examples/configs/r1_1p5b.yaml"), ["model.dtype=bf16", *args.overrides])
    arch = Arch.from_config(args.model_config)

    import torch

    gpu = torch.cuda.is_available()
    mem_gb = torch.cuda.get_device_properties(0).total_memory / GIB if gpu else args.gpu_mem_gb
    pred = prediction(cfg, arch, mem_gb)
    print(f"r1_1p5b on 1 GPU ({mem_gb:.0f} GB): {arch.params / 1e9:.2f}B params, ZeRO-{cfg.deepspeed.zero_stage}, "
          f"micro-batch {pred['micro_batch_tokens']} tokens; {args.sequences} x {args.seq_len}-token sequences")
    print(f"planner: train phase {pred['train_gb']:.2f} GB, optimizer step {pred['step_gb']:.2f} GB, "
          f"peak {pred['peak_gb']:.2f} GB (allocated, without the {TRAINER_RUNTIME_GIB} GB runtime: "
          f"{pred['peak_allocated_gb']:.2f} GB); budget {pred['budget_gb']} GB: "
          f"{'fits' if pred['peak_gb'] <= pred['budget_gb'] else 'over'}")
    if not gpu:
        print("no CUDA GPU: this benchmark measures a real step on one GPU; run it on a GPU machine "
              "(the prediction above is what it will be compared with)", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    m = measure(cfg, args.model_config, args.sequences, args.seq_len, args.steps)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in m["device"]), None)
    flops = 6 * arch.params * m["tokens"] / m["step_s"]
    rows = [("peak memory, allocated (GB)", pred["peak_allocated_gb"], m["peak_allocated_gb"]),
            ("peak memory, reserved + runtime (GB)", pred["peak_gb"], m["peak_reserved_gb"] + TRAINER_RUNTIME_GIB)]
    print(f"\n{m['device']}: step {m['step_s']:.2f} s (median of {args.steps}), {m['tokens']:,} tokens, "
          f"{m['tokens'] / m['step_s']:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s (6N), MFU "
          + (f"{flops / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else "n/a (pass --peak-tflops)"))
    print(f"\n{'quantity':<40}{'planner':>10}{'measured':>10}{'measured/planner':>18}")
    for label, p, v in rows:
        print(f"{label:<40}{p:>10.2f}{v:>10.2f}{v / p:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
