"""Variable-length attention for packed micro-batches on any device.

Packed sequences need attention that stays inside each sequence. Flash-attention's varlen
kernels do this on GPUs (`attn_implementation=flash_attention_2`, fed the same
`cu_seq_lens_*` arguments); everywhere else transformers would build a dense block-diagonal
`[T, T]` mask, whose cost grows with the square of the whole micro-batch. `packed_sdpa`
instead gathers the packed sequences into a padded `[S, H, L, D]` batch (L: the longest),
runs one causal SDPA call over it and scatters the real tokens back. Pads sit after each
sequence's tokens, so under the causal mask no real query ever sees one, and the pad rows'
outputs are dropped (they get no gradient): attention stays inside each sequence. One call
instead of one per sequence matters at RL shapes (hundreds of short sequences per
micro-batch), where per-call overhead, not arithmetic, dominated; the rest of the model
still skips the padding.
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
    gather, keep = _padded_index(cu_seq_lens_q)

    def padded(x):  # [1, H, T, D] -> [S, H, L, D]
        return x[0][:, gather].transpose(0, 1)

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0, enable_gqa=True)
    out = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # [S * L, H, D]
    return out.index_select(0, keep)[None], None


def _padded_index(cu_seq_lens: torch.Tensor):
    """`gather` [S, L]: the packed position of each padded slot (a pad repeats its sequence's
    last token, so every row stays finite); `keep` [T]: each packed token's padded slot."""
    cu = cu_seq_lens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    width = int(lens.max()) if lens.numel() else 0
    col = torch.arange(width, device=cu.device)
    gather = cu[:-1, None] + torch.minimum(col[None], (lens - 1).clamp(min=0)[:, None])
    keep = (torch.arange(len(lens), device=cu.device) * width).repeat_interleave(lens)
    keep = keep + torch.arange(int(cu[-1]), device=cu.device) - cu[:-1].repeat_interleave(lens)
    return gather, keep


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)


def training_attn_implementation(configured: str) -> str:
    """The implementation the trainer loads: flash-attention as configured, else packed SDPA."""
    return configured if configured.startswith("flash_attention") else PACKED_SDPA
