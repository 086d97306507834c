"""Per-token log-probs over a large vocabulary, without a [T, V] fp32 copy.

In RL for LLMs the log-prob pass is where memory goes: `log_softmax(logits.float())`
writes a full fp32 [T, V] tensor (2.5 GB at T=4096, V=151936) in forward and another in
backward. Here a row is reduced with an online log-sum-exp and only per-row statistics are
kept; backward recomputes softmax from the logits and writes grad_logits in the logits'
dtype, so the gradient itself is the only [T, V] tensor ever allocated.

This module is the project's single definition of a token's log-prob (the rollout server
uses the same): ``log_softmax(logits / temperature)[target]`` computed in fp32 (float64
for float64 inputs). Entropy (``return_entropy=True``) is differentiable too, so an
entropy bonus in the loss trains through it.

Backends: compiled kernels in ``csrc/`` (C++/OpenMP for CPU tensors, CUDA for CUDA
tensors), built just in time on first use and cached by ``torch.utils.cpp_extension``
(under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), and a chunked
pure-PyTorch reference that is always available and is used, with one warning, when a
kernel cannot be built. ``AT_LOGPROB_BACKEND=torch|cpp|cuda`` forces one.
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "token_logprobs",
    "token_logprobs_from_hidden",
    "lm_head_token_logprobs",
    "resolve_backend",
    "BACKENDS",
]

BACKENDS = ("torch", "cpp", "cuda")
ENV_BACKEND = "AT_LOGPROB_BACKEND"
CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Elements of a [rows, V] fp32 temporary in the PyTorch reference: large enough that the
# per-op overhead (kernel launches, OpenMP regions, which stall when cores are shared)
# stays small; measured best at 8-16M elements on a 2-core CPU.
_TORCH_CHUNK_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 24}

Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Kernels(NamedTuple):
    """One backend's two raw (non-autograd) entry points.

    forward(logits [T, V], targets int64 [T], temperature, with_entropy)
        -> (logprobs, lse, entropy), per-row, in the accumulation dtype; entropy is empty
        unless asked for.
    backward(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, out)
        writes grad_logits into `out` (logits' dtype and shape; may be `logits` itself);
        grad_entropy empty means no entropy term.
    """

    name: str
    forward: Callable
    backward: Callable


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Pure-PyTorch reference: chunks of rows, a few fp32 [rows, V] temporaries live at once.
# --------------------------------------------------------------------------------------


def _rows_per_chunk(logits: torch.Tensor) -> int:
    elems = _TORCH_CHUNK_ELEMS.get(logits.device.type, 1 << 22)
    return max(1, elems // max(logits.shape[-1], 1))


def _torch_forward(logits, targets, temperature: float, with_entropy: bool):
    T = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    lp = logits.new_empty(T, dtype=acc)
    lse = logits.new_empty(T, dtype=acc)
    ent = logits.new_empty(T if with_entropy else 0, dtype=acc)
    rows = _rows_per_chunk(logits)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        z = logits[s:e].to(acc) / temperature
        lse_c = torch.logsumexp(z, dim=-1)
        lse[s:e] = lse_c
        lp[s:e] = z.gather(1, targets[s:e, None])[:, 0] - lse_c
        if with_entropy:
            d = z.sub_(lse_c[:, None])  # log p
            p = d.exp()
            zero = p == 0  # 0 * log 0 = 0 (not NaN) at -inf logits
            ent[s:e] = -p.mul_(d).masked_fill_(zero, 0).sum(-1)
            del d, p, zero
        del z
    return lp, lse, ent


def _torch_backward(logits, targets, lse, ent, grad_lp, grad_ent, temperature: float, out):
    T = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    with_entropy = grad_ent.numel() > 0
    rows = _rows_per_chunk(logits)
    for s in range(0, T, rows):  # two [rows, V] temporaries: d (log p, then the grad) and p
        e = min(T, s + rows)
        d = logits[s:e].to(acc).div(temperature).sub_(lse[s:e, None])  # log p
        p = d.exp()
        g_lp = grad_lp[s:e, None]
        if with_entropy:  # -(g_lp + g_ent * (log p + H)) * p, and 0 where p == 0
            d.add_(ent[s:e, None]).mul_(grad_ent[s:e, None]).add_(g_lp).mul_(p).neg_()
            d.masked_fill_(p == 0, 0)
        else:
            d = torch.mul(p, g_lp, out=d).neg_()
        d.scatter_add_(1, targets[s:e, None], g_lp)
        out[s:e] = d.div_(temperature)
        del d, p
    return out


TORCH_KERNELS = Kernels("torch", _torch_forward, _torch_backward)


# --------------------------------------------------------------------------------------
# Compiled kernels: built on first use, once per process, cached on disk by torch.
# --------------------------------------------------------------------------------------

_lock = threading.Lock()
_built: dict = {}  # "cpp" | "cuda" -> Kernels or the exception the build raised
_warned: set = set()


def _cpu_tag() -> str:
    """Names the CPU build after the instruction sets it was compiled for (-march=native)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


# -fopenmp: at::parallel_for is a header template whose `omp parallel` is compiled into this
# extension, so without it every row runs on one thread (measured: cpu time == wall time).
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
CPU_LDFLAGS = ["-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_CFLAGS.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it
CUDA_CFLAGS = ["-O3"]  # torch adds -std=c++20 and the arch of the visible GPUs


def _build(kind: str) -> Kernels:
    from torch.utils import cpp_extension

    verbose = os.environ.get("AT_LOGPROB_VERBOSE", "") == "1"
    if kind == "cpp":
        cpp_extension.load(
            name=f"at_logprob_cpu_{_cpu_tag()}",
            sources=[str(CSRC / "logprob_cpu.cpp")],
            extra_cflags=CPU_CFLAGS,
            extra_ldflags=CPU_LDFLAGS,
            is_python_module=False,
            verbose=verbose,
        )
        ops = torch.ops.at_logprob_cpu
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA kernel needs a CUDA build of torch and a GPU")
        cpp_extension.load(
            name="at_logprob_cuda",
            sources=[str(CSRC / "logprob_cuda_ops.cpp"), str(CSRC / "logprob_cuda.cu")],
            extra_cflags=["-O3"],
            extra_cuda_cflags=CUDA_CFLAGS,
            extra_include_paths=[str(CSRC)],
            is_python_module=False,
            verbose=verbose,
        )
        ops = torch.ops.at_logprob_cuda
    return Kernels(kind, ops.forward, ops.backward)


def _compiled(kind: str) -> Kernels:
    """The compiled backend `kind`, building it once; raises RuntimeError if it cannot."""
    with _lock:
        if kind not in _built:
            try:
                _built[kind] = _build(kind)
            except Exception as exc:  # compiler missing, build error, no GPU...
                _built[kind] = exc
        got = _built[kind]
    if isinstance(got, Exception):
        why = str(got).strip()  # a failed build carries the whole compiler log: keep its end
        why = why if len(why) < 2000 else "..." + why[-2000:]
        raise RuntimeError(f"at_core.logprob: the {kind} kernel ({CSRC}) is unavailable: {why}") from got
    return got


def resolve_backend(device: Union[torch.device, str], backend: Optional[str] = None) -> Kernels:
    """The kernels that serve tensors on `device`.

    `backend` (else env AT_LOGPROB_BACKEND) is torch | cpp | cuda, or None/"auto": the
    device's compiled kernel (cuda for CUDA tensors, cpp for CPU ones), falling back to the
    PyTorch reference with one warning when it cannot be built. Forcing a compiled backend
    that cannot be built, or that does not serve the device, is an error.
    """
    device = torch.device(device)
    source = "backend" if backend else ENV_BACKEND
    choice = (backend or os.environ.get(ENV_BACKEND, "") or "auto").strip().lower()
    if choice not in ("auto",) + BACKENDS:
        raise ValueError(f"{source}={choice!r} is not a log-prob backend; expected one of "
                         f"{', '.join(BACKENDS)} (or unset for automatic)")
    native = {"cpu": "cpp", "cuda": "cuda"}.get(device.type)
    if choice == "torch" or (choice == "auto" and native is None):
        return TORCH_KERNELS
    if choice == "auto":
        try:
            return _compiled(native)
        except RuntimeError as exc:
            if native not in _warned:
                _warned.add(native)
                warnings.warn(
                    f"{exc}; using the PyTorch reference instead (set {ENV_BACKEND}=torch "
                    "to silence this)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return TORCH_KERNELS
    if choice != native:
        raise RuntimeError(f"{source}={choice} cannot serve {device.type} tensors "
                           f"(they take {native or 'torch'}, or torch)")
    return _compiled(choice)


# --------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------


def _check_targets(targets: torch.Tensor, V: int) -> torch.Tensor:
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token_logprobs: targets must be an integer tensor, got {targets.dtype}")
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    if targets.device.type == "cpu" and targets.numel():
        bad = (targets < 0) | (targets >= V)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"token_logprobs: targets[{i}] = {int(targets[i])} is outside "
                             f"the vocabulary [0, {V})")
    return targets


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    return temperature


class _TokenLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, kernels):
        lp, lse, ent = kernels.forward(logits, targets, temperature, with_entropy)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.kernels, ctx.with_entropy = temperature, kernels, with_entropy
        return (lp, ent) if with_entropy else lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        grad_lp, grad_ent = _grads_in(grad_lp, grad_ent, lse, ctx.with_entropy)
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        ctx.kernels.backward(logits, targets, lse, ent, grad_lp, grad_ent, ctx.temperature, out)
        return out, None, None, None, None


def _grads_in(grad_lp, grad_ent, like: torch.Tensor, with_entropy: bool):
    grad_lp = torch.zeros_like(like) if grad_lp is None else grad_lp.to(like.dtype).contiguous()
    if with_entropy and grad_ent is not None:
        grad_ent = grad_ent.to(like.dtype).contiguous()
    else:
        grad_ent = like.new_empty(0)
    return grad_lp, grad_ent


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    backend: Optional[str] = None,
) -> Result:
    """log_softmax(logits / temperature)[target] per row, in fp32, differentiable.

    logits: [T, V] (or [..., V]) fp32, bf16, fp16 or float64 (computed in float64, for
    gradcheck); targets: integer [T] (or [...]). Returns float32 [T] (float64 for float64
    logits), and the softmax entropy per row as well when `return_entropy`; both are
    differentiable (grad wrt logits of the log-prob: g * (onehot - softmax) / temperature).
    Rows may be strided (e.g. a vocabulary slice `logits[:, :V]`); other layouts are copied
    in the logits' dtype.
    """
    temperature = _check_temperature(temperature)
    if logits.dim() < 1:
        raise ValueError("token_logprobs: logits must be [T, V]")
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(
            f"token_logprobs: targets shape {tuple(targets.shape)} does not match logits "
            f"{tuple(logits.shape)} without its last (vocabulary) dimension"
        )
    logits2 = logits.reshape(-1, V)
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    tg = _check_targets(targets, V)
    kernels = resolve_backend(logits.device, backend)
    out = _TokenLogprobFn.apply(logits2, tg, temperature, bool(return_entropy), kernels)
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)


# --------------------------------------------------------------------------------------
# Fused lm_head + log-prob: logits only ever exist one chunk of rows at a time.
# --------------------------------------------------------------------------------------


class _LinearLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy, kernels):
        T = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        lp = hidden.new_empty(T, dtype=acc)
        lse = hidden.new_empty(T, dtype=acc)
        ent = hidden.new_empty(T if with_entropy else 0, dtype=acc)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            logits = F.linear(hidden[s:e], weight, bias)
            lp_c, lse_c, ent_c = kernels.forward(logits, targets[s:e], temperature, with_entropy)
            lp[s:e], lse[s:e] = lp_c, lse_c
            if with_entropy:
                ent[s:e] = ent_c
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.chunk, ctx.kernels = temperature, chunk, kernels
        ctx.with_entropy = with_entropy
        return (lp, ent) if with_entropy else lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_lp, grad_ent = _grads_in(grad_lp, grad_ent, lse, ctx.with_entropy)
        with_entropy = grad_ent.numel() > 0
        T, chunk = hidden.shape[0], ctx.chunk
        n_chunks = -(-T // chunk)
        # Several chunks of bf16 matmuls summed in bf16 would round once per chunk.
        w_acc = weight.dtype if n_chunks <= 1 else _acc_dtype(weight.dtype)
        grad_h = hidden.new_empty(hidden.shape) if need_h else None  # contiguous
        grad_w = torch.zeros(weight.shape, dtype=w_acc, device=weight.device) if need_w else None
        grad_b = bias.new_zeros(bias.shape, dtype=_acc_dtype(bias.dtype)) if need_b else None
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = hidden[s:e]
            g = F.linear(h, weight, bias)  # recomputed logits, overwritten by their gradient
            ent_c, g_ent_c = (ent[s:e], grad_ent[s:e]) if with_entropy else (ent, grad_ent)
            ctx.kernels.backward(g, targets[s:e], lse[s:e], ent_c, grad_lp[s:e], g_ent_c,
                                 ctx.temperature, g)
            if need_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if need_w:
                if w_acc == weight.dtype:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += torch.mm(g.t(), h)
            if need_b:
                grad_b += g.sum(0, dtype=grad_b.dtype)
            del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 4096,
    *,
    bias: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    backend: Optional[str] = None,
) -> Result:
    """token_logprobs(hidden @ weight.T + bias, targets), never holding more than `chunk`
    rows of logits: forward keeps per-row statistics only, backward recomputes each chunk's
    logits and turns them into their gradient in place. Gradients reach hidden, weight and
    bias; logits are computed in the hidden/weight dtype, as the model's lm_head would.

    hidden: [T, H] (or [..., H]); weight: [V, H]; targets: integer [T] (or [...]).
    """
    temperature = _check_temperature(temperature)
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"token_logprobs_from_hidden: chunk must be >= 1, got {chunk}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs_from_hidden: hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)} do not fit ([T, H] and [V, H]); under DeepSpeed ZeRO-3 an "
            "lm_head weight read outside its module is an empty shard: use "
            "lm_head_token_logprobs(lm_head, hidden, targets)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"token_logprobs_from_hidden: hidden is {hidden.dtype} but weight is {weight.dtype}"
        )
    lead = hidden.shape[:-1]
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(
            f"token_logprobs_from_hidden: targets shape {tuple(targets.shape)} does not match "
            f"hidden {tuple(hidden.shape)} without its last dimension"
        )
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    tg = _check_targets(targets, weight.shape[0])
    kernels = resolve_backend(hidden.device, backend)
    out = _LinearLogprobFn.apply(
        hidden2, weight, bias, tg, temperature, chunk, bool(return_entropy), kernels
    )
    if return_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)


def lm_head_token_logprobs(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 4096,
    *,
    return_entropy: bool = False,
    backend: Optional[str] = None,
) -> Result:
    """Fused log-probs through a model's `lm_head` (an nn.Linear), plain or DeepSpeed ZeRO-3.

    Under ZeRO-3 `lm_head.weight` is a partitioned parameter: read outside the module's
    forward it is an empty shard. So the fused op runs *inside* the module's own call (its
    forward is swapped for the duration): ZeRO-3's pre-forward hook gathers the weight,
    the hooks it puts on the outputs re-gather it before our backward, and the weight's
    gradient flows into the parameter as usual, so DeepSpeed's reduction hooks fire.
    Works with tied embeddings (the shared parameter simply receives both gradients).
    """
    if not hasattr(lm_head, "weight"):
        raise TypeError(f"lm_head_token_logprobs: {type(lm_head).__name__} has no weight")

    def fused_forward(h):
        return token_logprobs_from_hidden(
            h,
            lm_head.weight,
            targets,
            temperature,
            chunk,
            bias=getattr(lm_head, "bias", None),
            return_entropy=return_entropy,
            backend=backend,
        )

    had_own = "forward" in lm_head.__dict__
    previous = lm_head.__dict__.get("forward")
    lm_head.forward = fused_forward
    try:
        return lm_head(hidden)
    finally:
        if had_own:
            lm_head.forward = previous
        else:
            del lm_head.forward
