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
    lens = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    drop = dropout if module.training else 0.0
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
    parts = []
    for seqs in _length_buckets(lens):
        starts = [int(cu_seq_lens_q[i]) for i in seqs]
        width = max(lens[i] for i in seqs)
        keep = torch.cat([torch.arange(k * width, k * width + lens[i]) for k, i in enumerate(seqs)]).to(query.device)
        where = torch.cat([torch.arange(s, s + lens[i]) for s, i in zip(starts, seqs)]).to(query.device)

        def padded(x):  # [1, H, T, D] -> [S, H, L, D], zeros after each sequence's tokens
            rows = x.new_zeros(x.shape[1], len(seqs) * width, x.shape[3])
            src = x[0] if len(seqs) == len(lens) else x[0].index_select(1, where)  # one bucket: all, in order
            rows = rows.index_copy(1, keep, src)
            return rows.view(x.shape[1], len(seqs), width, x.shape[3]).transpose(0, 1)

        o = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True, scale=scaling,
                                           dropout_p=drop, enable_gqa=True)
        parts.append((where, o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]).index_select(0, keep)))
    if len(parts) == 1 and parts[0][0].numel() == out.shape[0]:
        return parts[0][1][None], None  # one bucket: its tokens are already in packed order
    out = out.index_copy(0, torch.cat([w for w, _ in parts]), torch.cat([o for _, o in parts]))
    return out[None], None


def _length_buckets(lens: list[int], max_buckets: int = 3) -> list[list[int]]:
    """Sequence indices grouped so that padding each group to its longest costs little.

    Attention over a padded group costs ~ count x longest^2; RL batches are often bimodal
    (short answers and long traces), where one group would pad the short ones several times
    over. Sorted by length, the groups are cut where the padded cost drops the most (greedy,
    at most `max_buckets` calls); sequences keep their order inside a group.
    """
    order = sorted(range(len(lens)), key=lambda i: (lens[i], i))
    cuts = [0, len(order)]

    def cost(a, b):
        return (b - a) * lens[order[b - 1]] ** 2 if b > a else 0

    while len(cuts) - 1 < max_buckets:
        best, gain = None, 0
        for j in range(len(cuts) - 1):
            a, b = cuts[j], cuts[j + 1]
            for c in range(a + 1, b):
                g = cost(a, b) - cost(a, c) - cost(c, b)
                if g > gain:
                    best, gain = c, g
        if best is None or gain < 0.1 * sum(cost(cuts[j], cuts[j + 1]) for j in range(len(cuts) - 1)):
            break
        cuts = sorted(cuts + [best])
    return [sorted(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)


def training_attn_implementation(configured: str) -> str:
    """The implementation the trainer loads: flash-attention as configured, else packed SDPA."""
    return configured if configured.startswith("flash_attention") else PACKED_SDPA
