"""Variable-length attention for packed micro-batches on any device.

Packed sequences need attention that stays inside each sequence. Flash-attention's varlen
kernels do this on GPUs (`attn_implementation=flash_attention_2`, fed the same
`cu_seq_lens_*` arguments); everywhere else transformers would build a dense block-diagonal
`[T, T]` mask, whose cost grows with the square of the whole micro-batch. `packed_sdpa`
instead runs PyTorch's SDPA per sequence (causal, GQA-aware), so attention costs what the
sequences themselves cost, as with padding, while the rest of the model skips the padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "at_packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """query `[1, H, T, D]`, key/value `[1, Hkv, T, D]`; returns `[1, T, H, D]` as transformers expects."""
    if cu_seq_lens_q is None:  # not a packed call (e.g. a plain forward): behave like sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a batch of one packed row")
    bounds = cu_seq_lens_q.tolist()
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=True)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)


def training_attn_implementation(configured: str) -> str:
    """The implementation the trainer loads: flash-attention as configured, else packed SDPA."""
    return configured if configured.startswith("flash_attention") else PACKED_SDPA
