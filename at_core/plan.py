"""Per-GPU memory plan of a recipe, proven on paper before a cluster is booked.

Weights cannot be downloaded where recipes are written, so the plan is built from the
architecture alone (`at_core.meta`) and the run config. It counts what each party holds
per GPU, in the phases that do not overlap in time:

- train (backward): the ZeRO-3 actor's shards, its gathered-layer and bucket buffers, the
  reference model (only when a KL term is on), checkpointed hidden states, then the larger
  of one recomputed layer and the log-prob pass over the vocabulary;
- step: the shards plus the fp32 gradient copy DeepSpeed makes for the optimizer;
- rollout: what the trainer keeps resident plus SGLang's static pool
  (`mem_fraction` x GPU memory: weights at `tp_size` and the KV cache) and its runtime.
Colocated, SGLang frees its weights and KV during the update, so the peak is the larger
phase; apart, the trainer and SGLang sit on different GPUs and the worse side counts.

Units: "GB" is 2**30 bytes, what nvidia-smi (MiB/1024) and DeepSpeed's estimator print.
Accuracy: model states follow DeepSpeed 0.19's allocations (tests hold them against its own
estimator); activations are counted tensor by tensor for a Qwen2/Llama decoder under HF
gradient checkpointing (tests hold one layer against what autograd saves); the runtime and
SGLang overheads are round figures. Treat a plan within 10% of the budget as unproven.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from at_core.config import ConfigError, load_config
from at_rollout import placement
from at_core.meta import build_meta_model, count_params, largest_module_params, load_model_config, shapes

GIB = 2**30
SAFETY_MARGIN = 0.10  # of the GPU: allocator fragmentation and what this model does not count
TRAINER_RUNTIME_GIB = 1.5  # CUDA context, cuBLAS workspaces, NCCL buffers of the trainer process
SGLANG_RUNTIME_GIB = 2.5  # outside SGLang's static pool while it serves: CUDA graphs, decode activations
SGLANG_RELEASED_GIB = 1.0  # what SGLang keeps after releasing weights, KV and graphs (context, caches)
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py), overridable via deepspeed.extra.
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "sub_group_size": 1e9}


@dataclass(frozen=True)
class Arch:
    """What the plan needs from the architecture, read off the meta model."""

    name: str
    params: int
    largest_module: int  # params of the largest single module (ZeRO-3 gathers it whole)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tensors: tuple  # at_core.meta.TensorShape, for the weight-sync plan

    @classmethod
    def from_config(cls, model_config: Any, dtype: str = "bf16") -> "Arch":
        mc = load_model_config(model_config)
        model = build_meta_model(mc, dtype=dtype)
        hd = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        name = mc.model_type
        if isinstance(model_config, (str, Path)):
            name = Path(model_config).stem if Path(model_config).is_file() else Path(model_config).name
        return cls(name, count_params(model),
                   largest_module_params(model), mc.hidden_size, mc.intermediate_size,
                   mc.num_hidden_layers, mc.num_attention_heads,
                   getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads, hd,
                   mc.vocab_size, tuple(shapes(model)))


def _zero_knobs(cfg: DictConfig) -> Dict[str, float]:
    extra = OmegaConf.to_container(cfg.deepspeed.extra, resolve=True) or {}
    zo = extra.get("zero_optimization", {}) or {}
    knobs = {k: float(zo.get(k, zo.get(k.replace("stage3_", ""), v))) for k, v in ZERO_DEFAULTS.items()}
    # DeepSpeed accumulates gradients in the model dtype unless data_types.grad_accum_dtype says fp32.
    knobs["grad_accum_bytes"] = 4 if str((extra.get("data_types") or {}).get("grad_accum_dtype", "")) in (
        "fp32", "float32", "torch.float32") else None
    return knobs


def model_states(params: int, largest_module: int, world: int, *, param_bytes: int = 2,
                 grad_bytes: int = 2, offload_optimizer: bool = False, offload_param: bool = False,
                 sub_group_size: float = 1e9, nodes: int = 1) -> Dict[str, float]:
    """ZeRO-3 model states in bytes per GPU (and CPU per node), as DeepSpeed 0.19 allocates them.

    Per parameter and shard: the low-precision param, the gradient partition (model dtype, on
    the optimizer's device), fp32 master + Adam m + v (12 bytes, on the optimizer's device);
    at the step one sub-group's gradients are copied to fp32 (`_prepare_fp32_grad_for_sub_group`).
    While a module runs, its full params and their full gradient live on the GPU (4 bytes x
    the largest module in bf16, the same term DeepSpeed's estimator uses).
    """
    shard = params / world
    step_copy = 4 * min(sub_group_size, shard)
    gpu = {"params": 0.0 if offload_param else param_bytes * shard,
           "grads": 0.0 if offload_optimizer else grad_bytes * shard,
           "optimizer": 0.0 if offload_optimizer else 12 * shard,
           "gathered": 2 * param_bytes * largest_module,
           "step_fp32_grad": 0.0 if offload_optimizer else step_copy}
    per_node = world / nodes
    cpu = 0.0
    if offload_optimizer:
        cpu += (grad_bytes + 12) * shard * per_node + 4 * min(sub_group_size, shard) * per_node
    if offload_param:
        cpu += param_bytes * shard * per_node
    held = gpu["params"] + gpu["grads"] + gpu["optimizer"]
    gpu["gpu_peak"] = held + max(gpu["gathered"], gpu["step_fp32_grad"])  # backward or step, not both
    gpu["cpu_per_node"] = cpu
    return gpu


def activation_bytes(arch: Arch, tokens: int, *, act_bytes: int = 2, attn: str = "sdpa",
                     checkpointing: bool = True) -> Dict[str, float]:
    """Training activations for one packed micro-batch of `tokens` tokens, counted per saved tensor.

    A Qwen2 decoder layer saves: per RMSNorm an fp32 copy of its input, the bf16 normalised
    value and the output; q, k, v and their rotary halves and results; k, v repeated to all
    heads (sdpa with a packed mask; flash-attention-2 reads them as they are); the attention
    output and log-sum-exp; the residual; gate, up, silu(gate) and their product. Attention
    is memory-efficient (no [T, T] scores); with sdpa the packed-sequence mask is [T, T]
    (bool, and a bf16 copy the kernel makes).
    """
    T, b = tokens, act_bytes
    th, tkv, ti = T * arch.hidden, T * arch.kv_heads * arch.head_dim, T * arch.intermediate
    norm = (4 + 2 * b) * th
    # q, rotate_half(q), q_embed; k, rotate_half(k), k_embed, v; the kernel's output and the
    # contiguous copy o_proj saves; fp32 log-sum-exp per head
    attn_saved = b * (3 * th + 4 * tkv) + 2 * b * th + 4 * arch.heads * T
    if attn != "flash_attention_2":
        attn_saved += 2 * b * th  # repeat_kv expands k and v to every query head
    if attn == "eager":
        attn_saved += 6 * arch.heads * T * T  # materialised scores and softmax (measured 6 bytes each)
    layer = 2 * norm + attn_saved + b * th + 4 * b * ti
    backward = 2 * b * ti + 2 * 4 * th  # gradients of gate/up outputs, fp32 norm gradients
    mask = 3 * T * T if attn == "sdpa" else 0
    saved_per_layer = b * th if checkpointing else layer
    return {"checkpoints": arch.layers * saved_per_layer + 2 * b * th + mask,
            "layer": (layer if checkpointing else 0) + backward, "layer_saved": layer}


def logprob_bytes(arch: Arch, tokens: int, chunk: int, act_bytes: int = 2) -> Dict[str, float]:
    """The lm_head + log-softmax pass: chunked (one [C, V] chunk at a time) and naive ([T, V])."""
    def rows(r):  # bf16 logits, fp32 logits, fp32 log_softmax, fp32 backward copy
        return (act_bytes + 3 * 4) * r * arch.vocab
    hidden_grad = 4 * tokens * arch.hidden
    naive = rows(tokens) + hidden_grad
    fused = rows(min(chunk, tokens)) + hidden_grad + 8 * tokens if chunk > 0 else naive
    return {"fused": fused, "naive": naive}


def rollout_bytes(arch: Arch, cfg: DictConfig, st: DictConfig, engines: int, gpu_mem_gb: float) -> Dict[str, float]:
    """SGLang per GPU: weights at tp_size, the KV cache the stage needs, and the static pool it takes.

    SGLang sizes its KV pool so that weights + pool = mem_fraction x the memory free when it
    starts; counted as if it started on an empty GPU (the larger case, and the order-free one).
    """
    tp = cfg.rollout.tp_size
    weights = 2 * arch.params / tp
    kv_heads_per_gpu = math.ceil(arch.kv_heads / tp)  # tp beyond the KV heads replicates them
    per_token = 2 * arch.layers * kv_heads_per_gpu * arch.head_dim * 2  # k and v, bf16
    seqs = math.ceil(st.prompts_per_step * st.rollouts_per_prompt / engines)
    need = seqs * (cfg.max_prompt_len + st.max_response_len) * per_token
    static = cfg.rollout.mem_fraction * gpu_mem_gb * GIB
    capacity = max(0.0, static - weights)
    return {"weights": weights, "kv_need": need, "kv_capacity": capacity, "static": static,
            "seqs_per_engine": seqs, "kv_per_token": per_token,
            "concurrency": min(1.0, capacity / need) if need else 1.0}


@dataclass(frozen=True)
class Hardware:
    """The cluster a plan is for. `rollout_gpus` matters only when SGLang is not colocated."""

    gpus: int
    gpu_mem_gb: float = 80.0
    nodes: int = 1
    cpu_mem_gb: Optional[float] = None  # per node; None: not checked
    rollout_gpus: Optional[int] = None

    @classmethod
    def from_cluster(cls, cluster: Any, *, gpus: Optional[int] = None, nodes: Optional[int] = None,
                     gpu_mem_gb: Optional[float] = None, cpu_mem_gb: Optional[float] = None,
                     rollout_gpus: Optional[int] = None) -> "Hardware":
        """The config's `cluster:` section, any field replaced by an explicit value.

        Only `gpus` given: the section's `gpus_per_node` decides the node count (one node
        when `gpus` is not a whole number of nodes).
        """
        gpn = int(cluster.gpus_per_node)
        if gpus is None:
            nodes = int(cluster.nodes) if nodes is None else nodes
            gpus = nodes * gpn
        elif nodes is None:
            nodes = gpus // gpn if gpus >= gpn and gpus % gpn == 0 else 1
        return cls(gpus, float(cluster.gpu_mem_gb if gpu_mem_gb is None else gpu_mem_gb), nodes,
                   cluster.cpu_mem_gb if cpu_mem_gb is None else cpu_mem_gb, rollout_gpus)

    @property
    def per_node(self) -> int:
        return self.gpus // self.nodes

    def scaled(self, nodes: int) -> "Hardware":
        rg = None if self.rollout_gpus is None else self.rollout_gpus * nodes // self.nodes
        return Hardware(self.per_node * nodes, self.gpu_mem_gb, nodes, self.cpu_mem_gb, rg)


def _stage_plan(cfg: DictConfig, arch: Arch, hw: Hardware, stage: str) -> Dict[str, Any]:
    st = cfg.stage[stage]
    gpus, nodes, gpu_mem_gb, rollout_gpus = hw.gpus, hw.nodes, hw.gpu_mem_gb, hw.rollout_gpus
    fp32 = cfg.model.dtype == "fp32"
    pb = 4 if fp32 else 2
    knobs = _zero_knobs(cfg)
    colocate = cfg.rollout.colocate
    train_gpus = gpus if colocate else gpus - rollout_gpus
    roll_gpus = gpus if colocate else rollout_gpus
    algo, ds = cfg.algorithm, cfg.deepspeed
    offload_opt, offload_param = ds.offload_optimizer, ds.offload_param
    if ds.zero_stage != 3:  # stages 1/2 shard only optimizer states (and grads); params stay whole
        offload_param = False
    ms = model_states(arch.params, arch.largest_module, train_gpus, param_bytes=pb,
                      grad_bytes=knobs["grad_accum_bytes"] or pb, offload_optimizer=offload_opt,
                      offload_param=offload_param, sub_group_size=knobs["sub_group_size"],
                      nodes=max(1, nodes if colocate else math.ceil(nodes * train_gpus / gpus)))
    if ds.zero_stage < 3:
        ms["params"], ms["gathered"] = pb * arch.params, 0.0
        if ds.zero_stage < 2 and not offload_opt:
            ms["grads"] = pb * arch.params
    longest = cfg.max_prompt_len + st.max_response_len
    tokens = max(algo.micro_batch_tokens, longest)  # a micro-batch holds at least one whole sequence
    act = activation_bytes(arch, tokens, act_bytes=pb, attn=cfg.model.attn_implementation,
                           checkpointing=cfg.model.gradient_checkpointing)
    lp = logprob_bytes(arch, tokens, algo.logprob_chunk, pb)
    buffers = knobs["reduce_bucket_size"] * pb + knobs["stage3_prefetch_bucket_size"] * pb
    ref = 0.0
    if algo.kl_coef > 0:
        ref = (0.0 if offload_param else pb * arch.params / train_gpus) + pb * arch.largest_module
    engines = max(1, roll_gpus // cfg.rollout.tp_size)
    ro = rollout_bytes(arch, cfg, st, engines, gpu_mem_gb)
    runtime = TRAINER_RUNTIME_GIB * GIB
    resident = ms["params"] + ms["grads"] + ms["optimizer"] + buffers + ref + runtime
    sglang_idle = SGLANG_RELEASED_GIB * GIB if colocate else 0.0
    train = resident + ms["gathered"] + act["checkpoints"] + max(act["layer"], lp["fused"]) + sglang_idle
    step = resident + ms["step_fp32_grad"] + sglang_idle
    sglang_active = ro["static"] + SGLANG_RUNTIME_GIB * GIB
    rollout = (resident if colocate else 0.0) + sglang_active
    gb = {"actor_params": ms["params"], "actor_grads": ms["grads"], "actor_optimizer": ms["optimizer"],
          "zero_buffers": ms["gathered"] + buffers, "ref_model": ref,
          "act_checkpoints": act["checkpoints"], "act_layer_recompute": act["layer"], "logprob": lp["fused"],
          "sglang_weights": ro["weights"], "sglang_kv": min(ro["kv_need"], ro["kv_capacity"]),
          "sglang_static": ro["static"], "runtime": runtime,
          "train_phase": train, "step_phase": step, "rollout_phase": rollout,
          "total": max(train, step, rollout)}
    gb = {k: round(v / GIB, 2) for k, v in gb.items()}
    mean_resp = st.max_response_len * MEAN_RESPONSE_FRAC
    seqs = st.prompts_per_step * st.rollouts_per_prompt
    notes = []
    if tokens > algo.micro_batch_tokens:
        notes.append(f"stage {stage}: sequences reach {longest} tokens, above algorithm.micro_batch_tokens="
                     f"{algo.micro_batch_tokens}; a micro-batch then holds one whole sequence ({tokens} tokens)")
    if ro["kv_capacity"] <= 0:
        notes.append(f"stage {stage}: SGLang's weights ({ro['weights'] / GIB:.1f} GB) exceed its static pool "
                     f"(rollout.mem_fraction={cfg.rollout.mem_fraction} x {gpu_mem_gb} GB): no room for KV")
    elif ro["concurrency"] < 1:
        notes.append(f"stage {stage}: KV for {ro['seqs_per_engine']} full-length sequences per engine needs "
                     f"{ro['kv_need'] / GIB:.1f} GB/GPU, the pool holds {ro['kv_capacity'] / GIB:.1f}: "
                     f"SGLang runs them in ~{math.ceil(1 / ro['concurrency'])} waves at worst")
    return {"stage": stage, "per_gpu_gb": gb, "micro_batch_tokens": tokens,
            "logprob_naive_gb": round(lp["naive"] / GIB, 2),
            "cpu_gb_per_node": round(ms["cpu_per_node"] / GIB, 1),
            "kv_concurrency": round(ro["concurrency"], 3), "train_gpus": train_gpus, "rollout_gpus": roll_gpus,
            "engines": engines, "sequences": seqs,
            "tokens_per_step_max": seqs * longest,
            "tokens_per_step_est": int(seqs * (MEAN_PROMPT_LEN + mean_resp)), "notes": notes,
            "kv_ok": ro["kv_capacity"] > 0}


MEAN_PROMPT_LEN = 150  # a DeepScaleR problem under the chat template, typically 100-200 tokens
MEAN_RESPONSE_FRAC = 0.6  # assumed mean response / length cap, for the tokens-per-step estimate only


def sync_plan(tensors, bucket_mb: int) -> Dict[str, Any]:
    """Greedy buckets in parameter order, as the weight sync fills them; an oversized tensor goes alone."""
    cap = bucket_mb * 2**20
    buckets, fill = 0, cap + 1
    for t in tensors:
        if fill + t.nbytes > cap or t.nbytes > cap:
            buckets, fill = buckets + 1, 0
        fill += t.nbytes
    big = max(tensors, key=lambda t: t.nbytes)
    return {"bucket_mb": bucket_mb, "buckets": buckets, "tensors": len(tensors),
            "total_mb": round(sum(t.nbytes for t in tensors) / 2**20, 1),
            "largest_tensor": big.name, "largest_tensor_mb": round(big.nbytes / 2**20, 1),
            "largest_exceeds_bucket": big.nbytes > cap}


def _budget(mem_gb: float) -> float:
    return round(mem_gb * (1 - SAFETY_MARGIN), 2)


def _worst(cfg: DictConfig, arch: Arch, hw: Hardware, stages: List[str]) -> Dict[str, Any]:
    plans = [_stage_plan(cfg, arch, hw, s) for s in stages]
    worst = max(plans, key=lambda p: (p["per_gpu_gb"]["total"], p["per_gpu_gb"]["train_phase"]))
    cpu_ok = hw.cpu_mem_gb is None or worst["cpu_gb_per_node"] <= _budget(hw.cpu_mem_gb)
    worst["fits"] = (worst["per_gpu_gb"]["total"] <= _budget(hw.gpu_mem_gb) and cpu_ok
                     and all(p["kv_ok"] for p in plans))
    worst["all_stages"] = plans
    return worst


def _override(cfg: DictConfig, dotted: List[str]) -> DictConfig:
    c = copy.deepcopy(cfg)
    for o in dotted:
        key, val = o.split("=", 1)
        OmegaConf.update(c, key, OmegaConf.create(f"v: {val}")["v"], merge=False)
    return c


def _suggest(cfg: DictConfig, arch: Arch, hw: Hardware, stages: List[str], worst: Dict[str, Any]) -> List[str]:
    """What to change when the plan does not fit, each change re-planned: config first, then hardware."""
    if worst["fits"]:
        return []
    gb, gpn = worst["per_gpu_gb"], hw.per_node
    ds, ro, algo = cfg.deepspeed, cfg.rollout, cfg.algorithm
    changes = []
    if not ds.offload_optimizer:
        changes.append(["deepspeed.offload_optimizer=true"])
    if not ds.offload_param:
        changes.append(["deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"])
    longest = cfg.max_prompt_len + max(cfg.stage[s].max_response_len for s in stages)
    if algo.micro_batch_tokens > longest:
        changes.append([f"algorithm.micro_batch_tokens={max(longest, algo.micro_batch_tokens // 2)}"])
    if gb["logprob"] >= gb["act_layer_recompute"] and algo.logprob_chunk > 1024:
        changes.append([f"algorithm.logprob_chunk={algo.logprob_chunk // 2}"])
    if cfg.model.attn_implementation == "sdpa":
        changes.append(["model.attn_implementation=flash_attention_2"])
    if ro.colocate and gb["rollout_phase"] >= gb["train_phase"] and ro.mem_fraction > 0.3:
        changes.append([f"rollout.mem_fraction={round(ro.mem_fraction - 0.1, 2)}"])
    if ro.tp_size * 2 <= gpn and (worst["kv_concurrency"] < 1 or not all(p["kv_ok"] for p in worst["all_stages"])):
        changes.append([f"rollout.tp_size={ro.tp_size * 2}"])
    out = []
    for change in changes:
        p = _worst(_override(cfg, change), arch, hw, stages)
        cpu = f", CPU {p['cpu_gb_per_node']} GB/node" if p["cpu_gb_per_node"] else ""
        out.append(f"{' '.join(change)}: peak {p['per_gpu_gb']['total']} GB{cpu} "
                   f"({'fits' if p['fits'] else 'still over'})")
    for n in range(hw.nodes + 1, hw.nodes + 17):
        p = _worst(cfg, arch, hw.scaled(n), stages)
        if p["fits"]:
            out.append(f"more GPUs: --gpus {gpn * n} --nodes {n}: peak {p['per_gpu_gb']['total']} GB (fits)")
            break
    else:
        out.append(f"more GPUs alone do not fit up to {hw.nodes + 16} nodes; combine with the changes above")
    return out


def plan(cfg: DictConfig, model_config: Any, gpus: int, gpu_mem_gb: float, nodes: int = 1,
         stage: Optional[str] = None, *, rollout_gpus: Optional[int] = None,
         cpu_mem_gb: Optional[float] = None) -> Dict[str, Any]:
    """The memory plan of `cfg` for the model at `model_config` (a directory, a config json, a config, an Arch).

    `stage` None plans every configured stage and reports the worst. `rollout_gpus` (not colocated
    only; default half) says how many of the `gpus` serve SGLang; `cpu_mem_gb` per node, when
    given, must hold the offloaded states. Returns a JSON-able dict.
    """
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes}")
    if not cfg.rollout.colocate:
        rollout_gpus = rollout_gpus or gpus // 2
    where = placement.resolve(cfg.rollout, nodes=nodes, gpus_per_node=gpus // nodes, rollout_gpus=rollout_gpus)
    hw = Hardware(gpus, gpu_mem_gb, nodes, cpu_mem_gb, rollout_gpus)
    stages = [str(stage)] if stage is not None else list(cfg.stage)
    for s in stages:
        if s not in cfg.stage:
            raise ValueError(f"stage {s!r} is not configured (stages: {', '.join(cfg.stage)})")
    arch = model_config if isinstance(model_config, Arch) else Arch.from_config(
        model_config, dtype="fp32" if cfg.model.dtype == "fp32" else "bf16")
    worst = _worst(cfg, arch, hw, stages)
    suggestions = _suggest(cfg, arch, hw, stages, worst)
    all_stages = worst.pop("all_stages")
    return {
        "model": arch.name, "params": arch.params, "largest_module_params": arch.largest_module,
        "gpus": gpus, "nodes": nodes, "gpu_mem_gb": gpu_mem_gb, "budget_gb": _budget(gpu_mem_gb),
        "cpu_mem_gb": cpu_mem_gb, "safety_margin": SAFETY_MARGIN, "colocate": bool(cfg.rollout.colocate),
        **worst,
        "stage_totals_gb": {p["stage"]: p["per_gpu_gb"]["total"] for p in all_stages},
        "stages": {p["stage"]: {"total_gb": p["per_gpu_gb"]["total"], "train_phase_gb": p["per_gpu_gb"]["train_phase"],
                                "tokens_per_step_max": p["tokens_per_step_max"],
                                "tokens_per_step_est": p["tokens_per_step_est"]} for p in all_stages},
        "notes": [n for p in all_stages for n in p["notes"]],
        "suggestions": suggestions,
        "sync": sync_plan(arch.tensors, cfg.rollout.sync_bucket_mb),
        "placement": {"sync": where.sync, "engines": where.engines, "engines_per_node": where.engines_per_node,
                      "trainer_gpus_per_node": where.trainer_gpus_per_node, "launched_gpus": list(where.launched.gpus),
                      "describe": where.describe()},
    }


_ROWS = [("actor_params", "actor params (ZeRO-3 shard)"), ("actor_grads", "actor gradients (shard)"),
         ("actor_optimizer", "fp32 master + Adam m, v (shard)"), ("zero_buffers", "ZeRO gathered layer + buckets"),
         ("ref_model", "reference model (KL on only)"), ("act_checkpoints", "checkpointed hidden states"),
         ("act_layer_recompute", "one layer recomputed + backward"), ("logprob", "log-prob pass (chunked)"),
         ("runtime", "CUDA/NCCL runtime"), ("sglang_weights", "SGLang weights (at tp_size)"),
         ("sglang_kv", "SGLang KV in use"), ("sglang_static", "SGLang static pool (mem_fraction)"),
         ("train_phase", "= train phase"), ("step_phase", "= optimizer step phase"),
         ("rollout_phase", "= rollout phase"), ("total", "PEAK per GPU")]


def format_table(result: Dict[str, Any], cfg: DictConfig) -> str:
    """The human-readable plan: components of the worst stage, verdict, per-stage peaks, sync, advice."""
    st = cfg.stage[result["stage"]]
    gb = result["per_gpu_gb"]
    lines = [
        f"model {result['model']}: {result['params'] / 1e9:.2f}B params, largest module "
        f"{result['largest_module_params'] / 1e6:.0f}M",
        f"{result['gpus']} GPUs on {result['nodes']} node(s) x {result['gpu_mem_gb']} GB, "
        f"{'colocated' if result['colocate'] else 'separate'} rollout ({result['engines']} SGLang engines, "
        f"tp {cfg.rollout.tp_size}), ZeRO-{cfg.deepspeed.zero_stage} offload optimizer="
        f"{cfg.deepspeed.offload_optimizer} param={cfg.deepspeed.offload_param}",
        f"worst stage {result['stage']}: {st.prompts_per_step} prompts x {st.rollouts_per_prompt} rollouts, "
        f"{cfg.max_prompt_len}+{st.max_response_len} tokens, micro-batch {result['micro_batch_tokens']} tokens",
        "", f"{'component':<36}{'GB/GPU':>9}", "-" * 45]
    for key, label in _ROWS:
        if key == "train_phase":
            lines.append("-" * 45)
        lines.append(f"{label:<36}{gb[key]:>9.2f}")
    verdict = "FITS" if result["fits"] else "DOES NOT FIT"
    lines += ["", f"budget {result['budget_gb']} GB ({result['gpu_mem_gb']} GB less a "
                  f"{int(result['safety_margin'] * 100)}% safety margin): {verdict}",
              f"train peak = resident + gathered + checkpoints + max(layer recompute, log-prob); "
              f"naive [T, V] log-prob would take {result['logprob_naive_gb']} GB",
              "per stage (peak / train phase / tokens per step, est.): " + "; ".join(
                  f"{k}: {v['total_gb']} / {v['train_phase_gb']} GB / {v['tokens_per_step_est']:,}"
                  for k, v in result["stages"].items()),
              f"CPU memory per node for offloaded states: {result['cpu_gb_per_node']} GB"
              + (f" (budget {_budget(result['cpu_mem_gb'])} GB)" if result["cpu_mem_gb"] else ""),
              f"tokens per step (stage {result['stage']}): {result['tokens_per_step_max']:,} at full length, "
              f"~{result['tokens_per_step_est']:,} at {MEAN_PROMPT_LEN}-token prompts and "
              f"{int(MEAN_RESPONSE_FRAC * 100)}%-of-cap responses"]
    sy = result["sync"]
    lines.append(f"weight sync: {sy['tensors']} tensors, {sy['total_mb']:.0f} MB in {sy['buckets']} buckets of "
                 f"{sy['bucket_mb']} MB; largest {sy['largest_tensor']} {sy['largest_tensor_mb']} MB"
                 + (" (sent alone, above the bucket size)" if sy["largest_exceeds_bucket"] else ""))
    lines.append(result["placement"]["describe"])
    lines += [f"note: {n}" for n in result["notes"]]
    lines += [f"suggest: {s}" for s in result["suggestions"]]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m at_core.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[], help="run config YAML (repeatable, merged in order)")
    ap.add_argument("--model-path", help="model directory (only config.json is read) or a config json; "
                                         "default: the config's model.path")
    ap.add_argument("--gpus", type=int, help="GPUs in total (default: cluster.nodes x cluster.gpus_per_node)")
    ap.add_argument("--nodes", type=int, help="default: cluster.nodes (or --gpus / cluster.gpus_per_node)")
    ap.add_argument("--gpu-mem-gb", type=float, help="default: cluster.gpu_mem_gb")
    ap.add_argument("--stage", help="plan one stage (default: every stage, the worst reported)")
    ap.add_argument("--rollout-gpus", type=int, help="GPUs serving SGLang when not colocated (default: half)")
    ap.add_argument("--cpu-mem-gb", type=float, help="host memory per node, to check offloaded states against "
                                                     "(default: cluster.cpu_mem_gb)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. algorithm.micro_batch_tokens=16384")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        model = args.model_path or cfg.model.path
        if not model:
            raise ConfigError("no model: pass --model-path or set model.path in the config")
        hw = Hardware.from_cluster(cfg.cluster, gpus=args.gpus, nodes=args.nodes, gpu_mem_gb=args.gpu_mem_gb,
                                   cpu_mem_gb=args.cpu_mem_gb)
        result = plan(cfg, model, hw.gpus, hw.gpu_mem_gb, hw.nodes, args.stage,
                      rollout_gpus=args.rollout_gpus, cpu_mem_gb=hw.cpu_mem_gb)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result, cfg))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
