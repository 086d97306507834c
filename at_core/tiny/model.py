"""The tiny world's model: a randomly initialised `Qwen2ForCausalLM`, saved as an HF directory.

Same architecture family as DeepSeek-R1-Distill-Qwen (untied lm_head, GQA, RoPE), so every
code path the real models take (ZeRO-3 partitioning, weight sync, the fused lm_head
log-prob) is exercised by the tiny one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

# name -> (hidden, intermediate, layers, heads, kv_heads)
SIZES = {
    "test": (64, 128, 2, 4, 2),  # ~0.1M parameters: unit tests
    "small": (128, 384, 4, 4, 2),  # ~0.9M: the SFT base of the embedded default (`sft.Recipe`)
    "wide": (192, 512, 6, 6, 2),  # ~2.5M: heavier generation for the rollout benchmark
}


def tiny_config(tokenizer, size: str = "small", max_positions: int = 1024) -> Qwen2Config:
    if size not in SIZES:
        raise ValueError(f"tiny model size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, inter, layers, heads, kv = SIZES[size]
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_model(model_dir: str | Path, size: str = "small", seed: int = 0) -> Qwen2ForCausalLM:
    """Initialise a model for the tokenizer already saved in `model_dir` and save it there."""
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tokenizer, size))
    save_model(model, tokenizer, model_dir)
    return model


def save_model(model, tokenizer, model_dir: str | Path) -> Path:
    """Write an HF directory (config, safetensors, tokenizer, generation config)."""
    model_dir = Path(model_dir)
    model.config.tiny_world = True  # the built-in task's models (at_core.tiny.is_tiny_world); kept in exports
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
    )
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir
