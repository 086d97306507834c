"""Models on the meta device: shapes and parameter counts without reading a single weight.

The scaling recipes (1.5B to 32B) are planned on machines that cannot hold, or download,
the weights. `transformers` builds the real module tree from `config.json` alone under
`torch.device("meta")`, so every count and shape here is the one DeepSpeed and SGLang will
see, not a formula that can drift from the architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

ModelSource = Union[str, Path, PretrainedConfig]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class TensorShape:
    """One named parameter as the weight sync sends it."""

    name: str
    shape: Tuple[int, ...]
    dtype_bytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_bytes


def load_model_config(source: ModelSource) -> PretrainedConfig:
    """A model directory (only its `config.json` is read), a config json file, or a config as is."""
    if isinstance(source, PretrainedConfig):
        return source
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"model directory {path} has no config.json" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"cannot read the model config: {where}")
    try:
        json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # `torch_dtype` deprecation chatter from stock config files
    try:
        return AutoConfig.from_pretrained(str(file))
    except (ValueError, KeyError) as err:
        raise ValueError(f"{file}: not a transformers model config ({err})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def build_meta_model(model_dir_or_config_json: ModelSource,
                     dtype: Union[str, torch.dtype, None] = None) -> torch.nn.Module:
    """The causal-LM module tree with every tensor on the meta device (no memory, no weights read).

    `dtype` defaults to the config's own (`torch_dtype`), else bf16, the dtype the recipes train in.
    """
    config = load_model_config(model_dir_or_config_json)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _unique_params(model: torch.nn.Module):
    # By identity: on the meta device every data_ptr() is 0, so pointer-based dedup (as
    # DeepSpeed's model_to_params does) would collapse the whole model into one tensor.
    seen = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return seen.values()


def count_params(model: torch.nn.Module) -> int:
    """Parameters counted once each (tied embeddings once)."""
    return sum(p.numel() for p in _unique_params(model))


def largest_module_params(model: torch.nn.Module) -> int:
    """The most parameters one module owns directly: what ZeRO-3 gathers at once (DeepSpeed's "largest layer")."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def shapes(model: torch.nn.Module) -> List[TensorShape]:
    """Named parameters in module order, as the weight sync walks them."""
    return [TensorShape(name, tuple(p.shape), p.element_size()) for name, p in model.named_parameters()]
