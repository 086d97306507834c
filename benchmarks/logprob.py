"""Per-token log-probs at RL scale: time and peak extra memory of forward + backward.

    python benchmarks/logprob.py                 # T=2048, V=151936, fp32 and bf16
    python benchmarks/logprob.py --T 512 --V 32000 --repeats 3

Methods, each against `naive` measured in the same run:
  naive    log_softmax(logits.float(), -1).gather(target): the textbook [T, V] fp32 path
  chunked  at_core.logprob's pure-PyTorch reference (rows in ~32 MiB fp32 chunks)
  kernel   at_core.logprob's compiled kernel (csrc/: C++/OpenMP on CPU, CUDA on GPU)
On a GPU with Liger-Kernel installed, `liger` (LigerCrossEntropyLoss, logits in) joins the
table, and a second table compares the fused lm_head path (hidden in, --H) with
naive linear + log_softmax and Liger's fused linear cross-entropy; bandwidth is reported
as the minimum traffic (read logits twice, write the gradient) over the time.

Every (method, dtype) runs in a fresh process so one method's allocator state cannot hide
another's memory. Memory on CPU: peak resident set size (VmHWM, reset through
/proc/self/clear_refs) minus the resident size just before the call; on GPU:
torch.cuda.max_memory_allocated minus the allocation before the call. "beyond grad"
subtracts the [T, V] gradient every method must return (logits' dtype), i.e. it is the
working memory the method adds on top of its output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------
# Child: one (method, dtype) measurement
# ------------------------------------------------------------------------------------------


def _rss_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


class CpuPeak:
    """Peak RSS above the current RSS, via the kernel's resettable high-water mark."""

    def __enter__(self):
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.base = _rss_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_bytes = (_rss_kib("VmHWM") - self.base) * 1024


class CudaPeak:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.extra_bytes = torch.cuda.max_memory_allocated() - self.base


def _logits_methods(torch, device):
    import at_core.logprob as L

    def naive(logits, targets):
        return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]

    methods = {
        "naive": naive,
        "chunked": lambda x, t: L.token_logprobs(x, t, backend="torch"),
        "kernel": lambda x, t: L.token_logprobs(x, t, backend="cuda" if device == "cuda" else "cpp"),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            # reduction="sum": Liger computes its gradient in forward for a scalar loss
            ce = LigerCrossEntropyLoss(reduction="sum")
            methods["liger"] = lambda x, t: -ce(x, t)
        except ImportError:
            pass
    return methods


def _hidden_methods(torch, device):
    import at_core.logprob as L

    def naive(hidden, weight, targets):
        logits = hidden @ weight.t()
        return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]

    methods = {
        "naive": naive,
        "kernel": lambda h, w, t: L.token_logprobs_from_hidden(h, w, t, chunk=4096),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def liger(h, w, t):  # returns the summed loss only (Liger fuses its backward)
                out = flce(w, h, t)
                return -(out[0] if isinstance(out, tuple) else out)

            methods["liger"] = liger
        except ImportError:
            pass
    return methods


def child(args) -> None:
    import torch

    device, dtype = args.device, getattr(torch, DTYPES[args.dtype])
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator(device="cpu").manual_seed(0)
    Peak = CudaPeak if device == "cuda" else CpuPeak
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if args.table == "logits":
        fn = _logits_methods(torch, device)[args.method]
        logits = (torch.randn(args.T, args.V, generator=g) * 2).to(device=device, dtype=dtype)
        logits.requires_grad_()
        targets = torch.randint(0, args.V, (args.T,), generator=g).to(device)
        adv = torch.randn(args.T, generator=g).to(device)
        inputs, grad_bytes = (logits,), logits.numel() * logits.element_size()
        small = (logits[:8].detach().clone().requires_grad_(), targets[:8])

        def run(x=logits, t=targets, a=adv):
            (fn(x, t) * a[: t.shape[0]]).sum().backward()
    else:
        fn = _hidden_methods(torch, device)[args.method]
        hidden = torch.randn(args.T, args.H, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(args.V, args.H, generator=g) / args.H**0.5).to(device=device, dtype=dtype)
        hidden.requires_grad_(), weight.requires_grad_()
        targets = torch.randint(0, args.V, (args.T,), generator=g).to(device)
        adv = torch.randn(args.T, generator=g).to(device)
        inputs = (hidden, weight)
        grad_bytes = sum(p.numel() * p.element_size() for p in inputs)
        small = None

        def run(x=None, t=targets, a=adv):
            out = fn(hidden, weight, t)
            (out * a if out.dim() else out).sum().backward()

    def clear():
        for p in inputs:
            p.grad = None

    if small is not None:  # builds/loads the kernel and warms code paths outside the timing
        run(small[0], small[1])
    times, cpu_times, peak = [], [], 0
    for i in range(args.repeats):
        clear()
        with Peak() as pk:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        peak = max(peak, pk.extra_bytes)
    print(json.dumps({"time_s": min(times), "times": times, "cpu_s": min(cpu_times),
                      "peak_bytes": peak, "grad_bytes": grad_bytes}))


# ------------------------------------------------------------------------------------------
# Parent: run the children, print the tables
# ------------------------------------------------------------------------------------------


def _measure(args, table: str, method: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--table", table, "--method", method,
           "--dtype", dtype, "--device", args.device, "--T", str(args.T), "--V", str(args.V),
           "--H", str(args.H), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _table(args, table: str, methods: list[str]) -> list[str]:
    cuda = args.device == "cuda"
    cols = ["dtype", "method", "time (s)", "x naive"]
    cols += ["GB/s"] if cuda else ["cpu time (s)", "x naive (cpu)"]
    cols += ["peak extra (GiB)", "beyond grad (MiB)", "beyond grad / naive"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    for dtype in args.dtypes:
        res = {m: _measure(args, table, m, dtype) for m in methods}
        base = res.get("naive", {})
        for m in methods:
            r = res[m]
            if "error" in r:
                lines.append(f"| {dtype} | {m} | error: {r['error'][:100]} |")
                print(lines[-1], flush=True)
                continue
            beyond = max(r["peak_bytes"] - r["grad_bytes"], 0)
            ok = "time_s" in base
            row = [dtype, m, f"{r['time_s']:.3f}", f"{base['time_s'] / r['time_s']:.2f}x" if ok else "-"]
            if cuda and table == "logits":
                traffic = 3 * args.T * args.V * (4 if dtype == "fp32" else 2)  # read x2, write x1
                row.append(f"{traffic / r['time_s'] / 1e9:.0f}")
            elif cuda:
                row.append("-")
            else:
                row += [f"{r['cpu_s']:.3f}", f"{base['cpu_s'] / r['cpu_s']:.2f}x" if ok else "-"]
            base_beyond = max(base.get("peak_bytes", 0) - base.get("grad_bytes", 0), 1)
            row += [_gib(r["peak_bytes"]), f"{beyond / 2**20:.0f}",
                    f"{100 * beyond / base_beyond:.1f}%" if ok else "-"]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    return lines


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048, help="tokens (rows)")
    p.add_argument("--V", type=int, default=151936, help="vocabulary (Qwen2.5: 151936)")
    p.add_argument("--H", type=int, default=1536, help="hidden size for the fused lm_head table")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--hidden-table", choices=["auto", "yes", "no"], default="auto",
                   help="also benchmark the fused lm_head path (auto: on GPU only)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--table", default="logits", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return child(args)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")

    methods = ["naive", "chunked", "kernel"]
    if args.device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            methods.append("liger")
        except ImportError:
            print("(Liger-Kernel not installed: no liger rows)")
    mem = "torch.cuda.max_memory_allocated" if args.device == "cuda" else \
        "peak RSS (VmHWM after /proc/self/clear_refs) above the pre-call RSS, fresh process per row"
    print(f"# Log-prob forward+backward, T={args.T}, V={args.V}, {args.device}: {_machine(args.device)}")
    print(f"# time: wall clock, best of {args.repeats}" + ("" if args.device == "cuda" else
          "; cpu time: user+system of the process (all threads), best of the same runs"))
    print(f"# memory: {mem}\n")
    _table(args, "logits", methods)
    if args.hidden_table == "yes" or (args.hidden_table == "auto" and args.device == "cuda"):
        print(f"\n# Fused lm_head (hidden [T, {args.H}] in; 'beyond grad' excludes the hidden and weight grads)\n")
        _table(args, "hidden", [m for m in ("naive", "kernel", "liger") if m in methods or m != "liger"])


if __name__ == "__main__":
    main()
