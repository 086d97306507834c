"""One prepared GPU check: what the CPU tests cannot prove, in one run of at most 8 minutes.

    python benchmarks/gpu_check.py [--skip zero3 ...] [--seq-len 8192] [--sequences 8]

For one H100/H200 with PyTorch, Triton and transformers; DeepSpeed, omegaconf, math-verify
and our server's packages carried as wheels; no SGLang, no flash-attn. Checks, in order
(each in its own try, so one failure does not hide the rest):

- logprob: the CUDA log-prob kernel (`at_core.logprob`, backend cuda) against naive PyTorch
  at [4096, 151936] bf16: forward and gradient errors against float64, GB/s of the forward
  against a device-to-device copy of the logits;
- ipc: the CUDA-IPC payload (`at_rollout.transports.cuda_ipc`) built from this process's CUDA tensors
  and rebuilt in a second process as SGLang does (UUID device, flattened bucket), bit for bit;
- server: our server on this GPU (bf16), colocated with a trainer copy of the model here;
  the trainer's weights changed and synced into it over HTTP (tensor path); then
- parity: the server's log-probs of its own samples against the trainer's recomputation in
  bf16 (`token_logprobs` over the trainer's logits);
- zero3: one bf16 ZeRO-3 policy-update step of the 1.5B architecture with random weights
  (`benchmarks/r1_1p5b_gpu_step.py`): tokens/s, MFU, peak memory against the planner.

Prints one table; exits 1 when a check failed, 2 (one line, no traceback) without CUDA.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def _sha(t) -> str:
    import torch

    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _timed(fn, device: str, repeats: int = 5) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------- checks: each returns rows
# (`device`/`backend` other than the defaults only for tests/test_gpu_check.py, which runs the
# checks' code on the CPU)


def check_logprob(rows: int = 4096, vocab: int = 151936, device: str = "cuda", backend: str = "cuda"):
    import torch

    from at_core.logprob import token_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=device)
    t = 0.6
    ref = torch.log_softmax(logits.double() / t, -1).gather(1, targets[:, None])[:, 0]
    x = logits.clone().requires_grad_(True)
    lp = token_logprobs(x, targets, t, backend=backend)
    lp.sum().backward()
    x64 = logits.double().requires_grad_(True)
    torch.log_softmax(x64 / t, -1).gather(1, targets[:, None]).sum().backward()
    naive = torch.log_softmax(logits.float() / t, -1).gather(1, targets[:, None])[:, 0]
    err, naive_err = (lp.double() - ref).abs().max().item(), (naive.double() - ref).abs().max().item()
    grad_err = (x.grad.double() - x64.grad).abs().max().item()
    bf16_ulp = (x64.grad.abs().max().item()) * 2**-8
    kernel_s = _timed(lambda: token_logprobs(logits, targets, t, backend=backend), device)
    copy_s = _timed(lambda: logits.clone(), device)
    nbytes = logits.numel() * logits.element_size()
    kernel_gbs, copy_gbs = nbytes / kernel_s / 1e9, 2 * nbytes / copy_s / 1e9
    return [("logprob fwd max|err| vs fp64", err <= max(2 * naive_err, 1e-4), f"{err:.2e}",
             f"<= max(2 x naive fp32 {naive_err:.2e}, 1e-4)"),
            ("logprob grad max|err| vs fp64", grad_err <= bf16_ulp, f"{grad_err:.2e}",
             f"<= 1 bf16 ulp ({bf16_ulp:.1e})"),
            ("logprob fwd GB/s (logits read)", kernel_gbs >= 0.3 * copy_gbs, f"{kernel_gbs:,.0f}",
             f">= 0.3 x copy {copy_gbs:,.0f} (read+write)")]


def _ipc_child(entry: str, queue) -> None:
    try:
        from at_rollout.transports import cuda_ipc

        queue.put({n: _sha(t) for n, t in cuda_ipc.decode(entry)})
    except Exception as err:  # reported by the parent
        queue.put(f"{type(err).__name__}: {err}")


def check_ipc(device: str = "cuda", rows: int = 8960):
    import base64
    import multiprocessing as mp

    import torch

    from at_rollout.transports import cuda_ipc

    torch.manual_seed(0)
    named = [(f"model.layers.{i}.mlp.up_proj.weight", torch.randn(rows, 1536, device=device).to(torch.bfloat16))
             for i in range(4)] + [("model.norm.weight", torch.randn(1536, device=device).to(torch.bfloat16))]
    t0 = time.perf_counter()
    flat, meta = cuda_ipc.flatten(named)
    if device == "cuda":
        torch.cuda.synchronize()
    entry = cuda_ipc.serialize(flat, meta)
    build_s = time.perf_counter() - t0
    uuid_sent = device != "cuda" or str(torch.cuda.get_device_properties(0).uuid).encode() in base64.b64decode(entry)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ipc_child, args=(entry, queue))
    t1 = time.perf_counter()
    proc.start()
    got = queue.get(timeout=120)
    proc.join(60)
    rebuild_s = time.perf_counter() - t1
    want = {n: _sha(t) for n, t in named}
    ok = got == want
    detail = "bit-identical" if ok else (got if isinstance(got, str) else "hash mismatch")
    del flat
    if device == "cuda":
        torch.cuda.ipc_collect()
    return [("ipc payload rebuilt in 2nd process", ok and uuid_sent, detail,
             f"{len(named)} tensors, {sum(t.numel() for _, t in named) * 2 / 2**20:.0f} MB; device sent as UUID: "
             f"{uuid_sent}; build {build_s * 1e3:.0f} ms, child {rebuild_s:.1f} s (incl. CUDA init)")]


def check_server_and_parity(tmp: Path, device: str = "cuda", dtype: str = "bfloat16"):
    import torch
    from transformers import AutoModelForCausalLM

    from at_core.logprob import token_logprobs
    from at_core.tiny import build_random_model
    from at_rollout.server.generator import logprob_temperature
    from at_rollout.backends.own_server import LocalServer
    from at_rollout.weight_sync import WeightSync

    model_dir = build_random_model(tmp / "model", size="wide")
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    with torch.no_grad():  # the "policy update": every weight moves
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = []
    temperature = 0.8
    sp = {"max_new_tokens": 48, "temperature": temperature, "top_p": 1.0, "n": 4, "sampling_seed": 3}
    prompts = [[1, 5, 9, 11, 40], [1, 7, 7, 100], [1, 20, 21, 22, 23, 24, 25]]
    with LocalServer(model_dir, extra_args=["--device", device, "--dtype", dtype],
                     log_file=tmp / "server.log") as server:
        client = server.client(timeout_s=300)
        ws = WeightSync(client, "tensor", bucket_mb=64, timeout_s=120)
        stats = ws.sync(trainer, weight_version="1")
        nbytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
        rows.append(("server on GPU: weight sync (HTTP tensor)", stats.bytes >= nbytes * 0.99,
                     f"{stats.bytes / 2**20:.0f} MB in {stats.seconds:.2f} s",
                     f"{stats.buckets} buckets, {stats.bytes / stats.seconds / 1e9:.2f} GB/s"))
        t0 = time.perf_counter()
        out = client.generate(prompts, sp, return_logprob=True)
        gen_s = time.perf_counter() - t0
        tokens = sum(len(s.output_ids) for s in out)
        rows.append(("server on GPU: generation", tokens > 0 and all(s.weight_version == "1" for s in out),
                     f"{tokens} tokens in {gen_s:.2f} s", "weight_version 1 in every sample's meta_info"))
        worst = 0.0
        with torch.no_grad():
            for s in out:
                p = prompts[s.prompt_index]
                ids = torch.tensor([p + s.output_ids], device=device)
                logits = trainer(input_ids=ids).logits[0, len(p) - 1:-1]
                mine = token_logprobs(logits, torch.tensor(s.output_ids, device=device),
                                      logprob_temperature(temperature))
                worst = max(worst, (mine.float().cpu() - torch.tensor(s.logprobs)).abs().max().item())
        rows.append(("rollout/trainer log-prob parity, bf16", worst <= 0.05, f"max|diff| {worst:.4f}",
                     "<= 0.05 (bf16 logits, batched vs single forward)"))
    return rows


def check_zero3(sequences: int, seq_len: int):
    spec = importlib.util.spec_from_file_location("r1_1p5b_gpu_step", ROOT / "benchmarks/r1_1p5b_gpu_step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    import torch

    from at_core.config import load_config
    from at_core.plan import TRAINER_RUNTIME_GIB, Arch

    os.environ.setdefault("DS_ACCELERATOR", "cuda")  # measure() joins a world of one (engines.init_distributed)
    cfg = load_config(str(ROOT / "examples/configs/r1_1p5b.yaml"), ["model.dtype=bf16"])
    arch = Arch.from_config(step.DEFAULT_MODEL)
    mem_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    pred = step.prediction(cfg, arch, mem_gb)
    m = step.measure(cfg, step.DEFAULT_MODEL, sequences, seq_len, steps=1)
    peak = next((v for k, v in step.PEAK_TFLOPS.items() if k in m["device"]), None)
    flops = 6 * arch.params * m["tokens"] / m["step_s"]
    ratio = m["peak_allocated_gb"] / pred["peak_allocated_gb"]
    reserved = m["peak_reserved_gb"] + TRAINER_RUNTIME_GIB
    return [("zero3 1.5B bf16 step", True, f"{m['step_s']:.2f} s, {m['tokens'] / m['step_s']:,.0f} tok/s",
             f"MFU {flops / (peak * 1e12):.1%} (6N) of {peak:g} TFLOP/s" if peak else "MFU n/a"),
            ("zero3 peak allocated vs planner", 0.7 <= ratio <= 1.1, f"{m['peak_allocated_gb']:.2f} GB",
             f"planner {pred['peak_allocated_gb']:.2f} GB (x{ratio:.2f}; reserved+runtime {reserved:.2f} GB "
             f"vs {pred['peak_gb']:.2f})")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="checks: logprob, ipc, server (with parity), zero3")
    ap.add_argument("--skip", nargs="*", default=[], choices=["logprob", "ipc", "server", "zero3"])
    ap.add_argument("--sequences", type=int, default=8, help="zero3: sequences per step")
    ap.add_argument("--seq-len", type=int, default=8192, help="zero3: tokens per sequence")
    ap.add_argument("--budget-s", type=float, default=480, help="checks not started by then fail as not run")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where one is",
              file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    checks = [("logprob", check_logprob), ("ipc", check_ipc), ("server", lambda: check_server_and_parity(tmp)),
              ("zero3", lambda: check_zero3(args.sequences, args.seq_len))]
    table, start = [], time.perf_counter()  # zero3 last: it needs the most, and leaves DeepSpeed behind
    for name, fn in checks:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        if t0 - start > args.budget_s:
            table.append((name, False, "not run", f"the {args.budget_s:.0f} s budget was spent"))
            continue
        try:
            rows = fn()
        except Exception as err:
            traceback.print_exc()
            rows = [(name, False, f"{type(err).__name__}: {str(err)[:80]}", "raised (traceback above)")]
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        table += rows
        torch.cuda.empty_cache()
    width = max(len(r[0]) for r in table) + 2
    print(f"\n{'check':<{width}}{'pass':<6}{'measured':<34}expected / notes")
    print("-" * (width + 100))
    for label, ok, measured, note in table:
        print(f"{label:<{width}}{'yes' if ok else 'NO':<6}{measured:<34}{note}")
    failed = [r[0] for r in table if not r[1]]
    print(f"\n{len(table) - len(failed)}/{len(table)} passed in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
