"""DeepSpeed ZeRO-3 engines for the actor (trainable) and the reference (frozen) policy.

Models are built under `deepspeed.zero.Init` (through transformers' ZeRO-3 integration),
so no rank ever holds the full fp32 model: each parameter is partitioned the moment it is
created and gathered only inside the forward/backward of the module that owns it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from at_core.attention import training_attn_implementation
from at_core.packing import PackedPolicy

log = logging.getLogger(__name__)


def accelerator_name() -> str:
    import deepspeed  # noqa: F401  (sets up the accelerator)
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def on_gpu() -> bool:
    return accelerator_name() == "cuda"


def init_distributed() -> None:
    """Join the trainer's process group: NCCL on GPUs, gloo on CPUs; a single process works too."""
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python ...`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if on_gpu() else "gloo"
    if not on_gpu() and os.environ.get("WORLD_SIZE") == "1":
        _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _skip_shm_comm_build() -> None:
    """A CPU world of one process never reduces across processes, yet DeepSpeed's CPU backend
    compiles its shared-memory allreduce op on init: ~35 s of a first run on a fresh
    machine (the tiny demo's included). Marking the op incompatible makes DeepSpeed fall
    back to plain torch.distributed, as it does on platforms without the op."""
    import deepspeed.ops

    with contextlib.suppress(Exception):  # a DeepSpeed without the probe: build as usual
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_dtype(cfg: DictConfig, gpu: Optional[bool] = None) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if (on_gpu() if gpu is None else gpu) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype]


def deepspeed_config(cfg: DictConfig, *, trainable: bool = True, gpu: Optional[bool] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict, from the run config plus the pass-through `deepspeed.extra`.

    `gpu` renders the config for a GPU (or CPU) rank regardless of this machine (dry runs).
    """
    gpu = on_gpu() if gpu is None else gpu
    ds = cfg.deepspeed
    world = dist.get_world_size() if dist.is_initialized() else 1
    zero: Dict[str, Any] = {
        "stage": ds.zero_stage,
        "stage3_param_persistence_threshold": 0,  # keep every parameter partitioned
        "stage3_gather_16bit_weights_on_model_save": False,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    conf: Dict[str, Any] = {
        # Micro-batches are sized by tokens, not samples; accumulation is driven by hand
        # (set_gradient_accumulation_boundary), and the loss is pre-scaled by the global
        # token count, so DeepSpeed's own batch bookkeeping is 1 x world.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": cfg.algorithm.grad_clip if trainable else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train_dtype(cfg, gpu) == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if trainable:
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.algorithm.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": cfg.algorithm.weight_decay,
                "torch_adam": not (ds.offload_optimizer and gpu),
            },
        }
    extra = OmegaConf.to_container(ds.extra, resolve=True) if isinstance(ds.extra, DictConfig) else dict(ds.extra)
    return _deep_merge(conf, extra or {})


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_model(model_path: str, cfg: DictConfig, ds_config: Optional[Dict[str, Any]] = None):
    """Load an HF causal LM; under ZeRO-3 its parameters are partitioned as they are created."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config and ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=train_dtype(cfg), attn_implementation=training_attn_implementation(cfg.model.attn_implementation)
    )
    del keep_alive  # transformers only consults it during from_pretrained
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_actor(model_path: str, cfg: DictConfig):
    """The trainable policy as a ZeRO-3 DeepSpeed engine (with its AdamW optimizer)."""
    import deepspeed

    init_distributed()
    ds_config = deepspeed_config(cfg, trainable=True)
    model = PackedPolicy(load_model(model_path, cfg, ds_config))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def build_reference(model_path: str, cfg: DictConfig):
    """The frozen reference policy (only when a KL term is on), ZeRO-3 partitioned, no optimizer."""
    import deepspeed

    init_distributed()
    ds_config = deepspeed_config(cfg, trainable=False)
    model = PackedPolicy(load_model(model_path, cfg, ds_config))
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def policy_lm(engine):
    """The HF model inside an engine (HF parameter names: for export and weight sync)."""
    return engine.module.lm


def reset_optimizer(engine) -> None:
    """Forget the optimizer's state (AdamW's moments and step counts), keeping the weights.

    DeepSpeed wraps the torch optimizer (ZeRO's partitioned optimizer, a mixed-precision
    wrapper); the innermost one holds the state, which AdamW re-creates from zero on its
    next step, exactly as a freshly built engine would.
    """
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"reset_optimizer: no torch optimizer inside {type(engine.optimizer).__name__}")
    opt.state.clear()


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
