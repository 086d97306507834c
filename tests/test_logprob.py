"""Per-token log-prob kernels (at_core.logprob, csrc/) against float64 references.

Inputs are fresh random draws each run (the seed is printed on failure by pytest's
parametrisation ids). Errors are norm-wise relative: max|ours - ref| / max|ref|.
Run as a script (`--zero3-worker`), this file is the worker of the ZeRO-3 test.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from at_core import logprob as L

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "cpp"]
SEED = int.from_bytes(os.urandom(4), "little")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """log-probs and entropies in float64 from the same logit values (differentiable)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = logp.gather(-1, targets[..., None].long())[..., 0]
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0)).sum(-1)  # 0 * log 0 = 0, with finite gradients
    return lp, ent


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def built_cpp():
    """Build (or load from cache) the CPU kernel once, so a build failure fails loudly here."""
    L.resolve_backend("cpu", "cpp")


# ------------------------------------------------------------------------------------------
# Values and gradients against float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_float64_reference(backend, dtype, temperature):
    g = gen(SEED)
    T, V = 37, 3001 + int(torch.randint(0, 64, (1,), generator=g))  # V: no multiple of 16
    raw = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (T,), generator=g)
    logits = raw.to(dtype).requires_grad_()
    lp, ent = L.token_logprobs(logits, targets, temperature, return_entropy=True, backend=backend)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (T,)

    x64 = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = reference(x64, targets, temperature)
    # Same logit values: the computation itself is fp32 whatever the input dtype.
    assert rel_err(lp, ref_lp) <= 1e-6, f"seed {SEED}"
    assert rel_err(ent, ref_ent) <= 1e-5, f"seed {SEED}"
    if dtype != torch.float32:  # against the logits before rounding to 16 bits
        assert rel_err(lp, reference(raw, targets, temperature)[0]) <= 1e-2, f"seed {SEED}"

    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(T, generator=g, dtype=torch.float64)
    (lp * g_lp).sum().add((ent * g_ent).sum()).backward()
    (ref_lp * g_lp).sum().add((ref_ent * g_ent).sum()).backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == (T, V)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(logits.grad, x64.grad) <= tol, f"seed {SEED}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    g = gen(SEED)
    logits = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    targets = torch.randint(0, 9, (4,), generator=g)

    def f(x):
        return L.token_logprobs(x, targets, 0.7, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_rescale_across_blocks(backend):
    """Rows whose max keeps rising (or falls) across the CPU kernel's 2048-wide blocks."""
    V = 2048 * 3 + 7
    up = torch.linspace(-20, 20, V, dtype=torch.float64)
    logits = torch.stack([up, up.flip(0), up.roll(V // 2), torch.zeros(V, dtype=torch.float64)])
    logits = (logits + 0.01 * torch.randn(logits.shape, generator=gen(SEED), dtype=torch.float64))
    logits = logits.float().requires_grad_()
    targets = torch.tensor([V - 1, 5, 2048, 4097])
    lp, ent = L.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    ref_lp, ref_ent = reference(logits.detach(), targets, 1.0)
    assert rel_err(lp, ref_lp) <= 1e-6 and rel_err(ent, ref_ent) <= 1e-5


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.zeros(0, 11, requires_grad=True)
    lp, ent = L.token_logprobs(logits, torch.zeros(0, dtype=torch.long), return_entropy=True,
                               backend=backend)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 15, 17, 2049])
def test_odd_vocab_sizes(backend, V):
    g = gen(SEED + V)
    logits = torch.randn(5, V, generator=g).requires_grad_()
    targets = torch.randint(0, V, (5,), generator=g)
    lp = L.token_logprobs(logits, targets, 1.3, backend=backend)
    x64 = logits.detach().double().requires_grad_()
    ref = reference(x64, targets, 1.3)[0]
    if V == 1:
        assert torch.equal(lp, torch.zeros(5))
    else:
        assert rel_err(lp, ref) <= 1e-6
    lp.sum().backward()
    ref.sum().backward()
    assert (logits.grad.double() - x64.grad).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
    """Masked (-inf) vocabulary entries: zero probability, zero gradient, finite entropy."""
    g = gen(SEED)
    V = 100
    logits = torch.randn(4, V, generator=g)
    logits[:, ::3] = float("-inf")
    targets = torch.tensor([1, 2, 4, 3])  # row 3 targets a -inf entry
    x = logits.clone().requires_grad_()
    lp, ent = L.token_logprobs(x, targets, 0.8, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_()
    ref_lp, ref_ent = reference(x64, targets, 0.8)
    assert lp[3] == float("-inf")
    assert rel_err(lp[:3], ref_lp[:3]) <= 1e-6 and rel_err(ent, ref_ent) <= 1e-5
    (lp[:3].sum() + ent.sum()).backward()
    (ref_lp[:3].sum() + ref_ent.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, ::3] == 0).all()
    assert rel_err(x.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_row_is_nan_like_torch(backend):
    logits = torch.randn(2, 40)
    logits[1] = float("-inf")
    lp = L.token_logprobs(logits, torch.tensor([3, 3]), backend=backend)
    ref = torch.log_softmax(logits, -1)[:, 3]
    torch.testing.assert_close(lp, ref, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = gen(SEED)
    T, V, pad = 6, 301, 19
    # A vocabulary slice (strided rows), a transposed layout, strided targets, [B, S, V].
    padded = torch.randn(T, V + pad, generator=g)
    transposed = torch.randn(V, T, generator=g).t()
    targets = torch.randint(0, V, (2 * T,), generator=g)[::2]
    assert not targets.is_contiguous() and not transposed.is_contiguous()
    for logits in (padded[:, :V], transposed):
        x = logits.detach().requires_grad_()
        lp = L.token_logprobs(x, targets, 0.9, backend=backend)
        x64 = logits.detach().double().requires_grad_()
        ref = reference(x64, targets, 0.9)[0]
        assert rel_err(lp, ref) <= 1e-6
        (lp * torch.arange(T)).sum().backward()
        (ref * torch.arange(T)).sum().backward()
        assert rel_err(x.grad, x64.grad) <= 1e-5
    batched = padded[:, :V].reshape(2, 3, V)
    lp3 = L.token_logprobs(batched, targets.reshape(2, 3), 0.9, backend=backend)
    assert lp3.shape == (2, 3)
    assert rel_err(lp3.reshape(-1), reference(padded[:, :V], targets, 0.9)[0]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_errors_are_clear(backend):
    logits = torch.randn(3, 10)
    with pytest.raises(IndexError, match=r"targets\[1\] = 10 is outside the vocabulary \[0, 10\)"):
        L.token_logprobs(logits, torch.tensor([0, 10, 2]), backend=backend)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.token_logprobs(logits, torch.tensor([0, 1, 2]), 0.0, backend=backend)
    with pytest.raises(ValueError, match="targets shape"):
        L.token_logprobs(logits, torch.tensor([0, 1]), backend=backend)


# ------------------------------------------------------------------------------------------
# Backend choice
# ------------------------------------------------------------------------------------------


def test_backend_env_choice(monkeypatch):
    monkeypatch.setenv(L.ENV_BACKEND, "torch")
    assert L.resolve_backend("cpu").name == "torch"
    monkeypatch.setenv(L.ENV_BACKEND, "cpp")
    assert L.resolve_backend("cpu").name == "cpp"
    monkeypatch.setenv(L.ENV_BACKEND, "cuda")
    with pytest.raises(RuntimeError, match="AT_LOGPROB_BACKEND=cuda cannot serve cpu tensors"):
        L.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
    monkeypatch.setenv(L.ENV_BACKEND, "triton")
    with pytest.raises(ValueError, match="expected one of torch, cpp, cuda"):
        L.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
    monkeypatch.delenv(L.ENV_BACKEND)
    assert L.resolve_backend("cpu").name == "cpp"


FALLBACK_SCRIPT = """
import warnings, torch
from at_core.logprob import token_logprobs, resolve_backend
x, t = torch.randn(3, 50, dtype=torch.float64), torch.tensor([1, 2, 3])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = token_logprobs(x.float(), t)
    b = token_logprobs(x.float(), t)
ref = torch.log_softmax(x, -1)[torch.arange(3), t]
assert (a.double() - ref).abs().max() < 1e-5 and torch.equal(a, b)
msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
assert len(msgs) == 1 and "using the PyTorch reference" in msgs[0], msgs
assert resolve_backend("cpu").name == "torch"
try:
    resolve_backend("cpu", "cpp")
except RuntimeError as e:
    assert "the cpp kernel" in str(e) and "unavailable" in str(e), e
else:
    raise AssertionError("forcing an unbuildable backend must fail")
print("OK")
"""


@pytest.mark.timeout(120)
def test_fallback_warns_once_when_kernel_cannot_build(tmp_path):
    """A real failed build (no working C++ compiler): one warning, then the torch path."""
    env = {
        **os.environ,
        "CXX": "/bin/false",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "AT_LOGPROB_BACKEND": "",
    }
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# Fused lm_head + log-prob
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_hidden_gradcheck(backend):
    g = gen(SEED)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(11, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 11, (7,), generator=g)

    def f(h, w, b):  # chunk=3: three chunks, the last one short
        return L.token_logprobs_from_hidden(h, w, targets, 0.8, chunk=3, bias=b,
                                            return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_matches_plain_path(backend, dtype):
    g = gen(SEED)
    T, H, V = 50, 24, 997
    hidden = (torch.randn(T, H, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    adv = torch.randn(T, generator=g)
    lp = L.token_logprobs_from_hidden(hidden, weight, targets, 0.7, chunk=16, backend=backend)
    (lp * adv).sum().backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = reference(h64 @ w64.t(), targets, 0.7)[0]
    (ref * adv.double()).sum().backward()
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    assert rel_err(lp, ref) <= tol[0]
    assert hidden.grad.dtype == weight.grad.dtype == dtype
    assert rel_err(hidden.grad, h64.grad) <= tol[1]
    assert rel_err(weight.grad, w64.grad) <= tol[1]


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_plain_torch(tied):
    g = gen(SEED)
    V, H, T = 64, 16, 12
    embed = torch.nn.Embedding(V, H)
    lm_head = torch.nn.Linear(H, V, bias=False)
    if tied:
        lm_head.weight = embed.weight
    ids = torch.randint(0, V, (T,), generator=g)
    targets = torch.randint(0, V, (T,), generator=g)

    def grads(fused: bool):
        embed.zero_grad(), lm_head.zero_grad()
        hidden = torch.tanh(embed(ids))
        if fused:
            lp = L.lm_head_token_logprobs(lm_head, hidden, targets, 0.9, chunk=5)
        else:
            lp = torch.log_softmax(lm_head(hidden) / 0.9, -1).gather(1, targets[:, None])[:, 0]
        lp.sum().backward()
        return lp.detach(), embed.weight.grad.clone(), lm_head.weight.grad.clone()

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "forward" not in lm_head.__dict__  # the module's forward is restored
    assert lm_head(torch.zeros(2, H)).shape == (2, V)


# ------------------------------------------------------------------------------------------
# ZeRO-3: a real DeepSpeed engine with partitioned parameters, 2 CPU ranks
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_lm_head_under_zero3_matches_plain_path(tiny_model_dir, tmp_path):
    from helpers import torchrun

    out = tmp_path / "zero3.pt"
    torchrun(Path(__file__), 2, "--zero3-worker", tiny_model_dir, out, timeout=280)
    res = torch.load(out)
    assert set(res) == {"untied", "tied"}
    for tied, r in res.items():
        assert r["sharded_weight_numel"] == 0, "lm_head.weight should be partitioned outside forward"
        assert "lm_head_token_logprobs" in r["outside_error"]
        for key in ("lp", "lm_head", "hidden", "embed"):
            fused, plain = r["fused"][key], r["plain"][key]
            assert rel_err(fused, plain) <= 2e-6, (tied, key)
        # the tied case shares one parameter; the untied one must not
        assert torch.equal(r["fused"]["lm_head"], r["fused"]["embed"]) == (tied == "tied")


def _zero3_worker(model_dir: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from transformers import Qwen2ForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    class Policy(torch.nn.Module):
        """Backbone then either the fused lm_head path or the plain one, in one engine forward."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids, targets, fused: bool):
            hidden = self.lm.model(input_ids=ids).last_hidden_state[0]
            hidden.retain_grad()
            self.hidden = hidden
            if fused:
                return L.lm_head_token_logprobs(self.lm.lm_head, hidden, targets, 0.8, chunk=5)
            logits = self.lm.lm_head(hidden)
            return torch.log_softmax(logits.float() / 0.8, -1).gather(1, targets[:, None])[:, 0]

    results = {}
    for tied in ("untied", "tied"):
        lm = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if tied == "tied":  # the project's tiny model is untied, like R1-Distill-Qwen
            lm.config.tie_word_embeddings = True
            lm.lm_head.weight = lm.model.embed_tokens.weight
        assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == (tied == "tied")
        policy = Policy(lm)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=config)
        V = lm.config.vocab_size
        g = torch.Generator().manual_seed(SEED + rank)
        S = 13
        ids = torch.randint(0, V, (1, S), generator=g)
        targets = torch.randint(0, V, (S,), generator=g)
        adv = torch.randn(S, generator=g)
        res = {"sharded_weight_numel": engine.module.lm.lm_head.weight.numel()}
        try:  # the trap TRL hit: the weight read outside its module is an empty shard
            L.token_logprobs_from_hidden(torch.randn(S, lm.config.hidden_size),
                                         engine.module.lm.lm_head.weight, targets)
            res["outside_error"] = ""
        except ValueError as exc:
            res["outside_error"] = str(exc)
        for fused in (True, False):
            lp = engine(ids, targets, fused)
            engine.backward(-(lp * adv).sum())
            res["fused" if fused else "plain"] = {
                "lp": lp.detach().clone(),
                "lm_head": safe_get_full_grad(engine.module.lm.lm_head.weight).clone(),
                "embed": safe_get_full_grad(engine.module.lm.model.embed_tokens.weight).clone(),
                "hidden": engine.module.hidden.grad.clone(),
            }
            engine.step()  # lr 0: parameters unchanged; gradients cleared for the next pass
        results[tied] = res
    if rank == 0:
        torch.save(results, out)
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from world import leave_world

    leave_world()


# ------------------------------------------------------------------------------------------
# The CUDA source compiles (nvcc without a GPU)
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{L.CSRC}"]
    # CPU builds of torch ship c10/cuda headers without the build-generated macros header.
    torch_inc = Path(cpp_extension.include_paths()[0])
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        stub = tmp_path / "stub/c10/cuda/impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp_path / 'stub'}")
    arch = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_80,code=sm_80"]
    jobs = [
        # the kernels: device code for two architectures
        ["nvcc", "-c", str(L.CSRC / "logprob_cuda.cu"), "-o", str(tmp_path / "k.o"),
         "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *arch, *includes],
        # the torch binding (host code; torch's headers need C++20)
        ["nvcc", "-c", str(L.CSRC / "logprob_cuda_ops.cpp"), "-o", str(tmp_path / "ops.o"),
         "-std=c++20", "-O0", "-Xcompiler", "-fPIC", *includes],
    ]
    procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for j in jobs]
    for j, p in zip(jobs, procs):
        output, _ = p.communicate(timeout=280)
        assert p.returncode == 0, f"{' '.join(j)}\n{output[-6000:]}"
    assert (tmp_path / "k.o").stat().st_size > 0 and (tmp_path / "ops.o").stat().st_size > 0


if __name__ == "__main__" and "--zero3-worker" in sys.argv:
    warnings.filterwarnings("ignore")
    i = sys.argv.index("--zero3-worker")
    _zero3_worker(sys.argv[i + 1], sys.argv[i + 2])
