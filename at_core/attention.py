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

Because a sequence is gathered by index, its prompt need not sit next to its response: the
rollouts of one prompt can share a single copy of the prompt in the packed row
(`PackedLayout`, built by `at_core.packing.pack`). Each gathers that copy as its own
prefix, so attention sees exactly the unshared sequence, while every other layer computes
the prompt once instead of once per rollout; the prompt's outputs are taken from its first
sequence, and its gradient sums over all of them, as it would over the copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "at_packed_sdpa"


class _Bucket(NamedTuple):
    count: int  # sequences in the padded batch
    width: int  # their longest length
    src: torch.Tensor | None  # packed row of every gathered token, in padded order (None: the whole row, in order)
    slot: torch.Tensor  # padded slot of every gathered token
    out_pos: torch.Tensor  # packed rows this bucket writes (each row is written by exactly one bucket)
    out_slot: torch.Tensor  # the padded slots they are read from


@dataclass
class PackedLayout:
    """Where each sequence of a packed row sits: a prompt span (possibly shared by several
    sequences) and its response span right after or elsewhere in the row."""

    prompts: List[Tuple[int, int]]  # (start, length) of each sequence's prompt span
    responses: List[Tuple[int, int]]  # (start, length) of each sequence's response span
    owns_prompt: List[bool]  # the prompt's outputs come from this sequence (one per prompt copy)
    total: int  # tokens in the packed row
    _buckets: Dict[str, List[_Bucket]] = field(default_factory=dict, repr=False)

    @property
    def shared(self) -> bool:
        return not all(self.owns_prompt)

    def lengths(self) -> List[int]:
        return [p[1] + r[1] for p, r in zip(self.prompts, self.responses)]

    def buckets(self, device: torch.device) -> List[_Bucket]:
        """The gather plan of the padded SDPA calls, built once per row and device (every layer reuses it)."""
        key = str(device)
        if key not in self._buckets:
            self._buckets[key] = self._plan(device)
        return self._buckets[key]

    def _plan(self, device) -> List[_Bucket]:
        lens = self.lengths()
        groups = _length_buckets(lens)
        out = []
        for seqs in groups:
            width = max(lens[i] for i in seqs)
            src, slot, out_pos, out_slot = [], [], [], []
            for k, i in enumerate(seqs):
                (ps, pl), (rs, rl) = self.prompts[i], self.responses[i]
                rows = list(range(ps, ps + pl)) + list(range(rs, rs + rl))
                slots = range(k * width, k * width + pl + rl)
                src.extend(rows)
                slot.extend(slots)
                first = 0 if self.owns_prompt[i] else pl
                out_pos.extend(rows[first:])
                out_slot.extend(slots[first:])
            whole = len(groups) == 1 and src == list(range(self.total))

            def t(x):
                return torch.tensor(x, dtype=torch.long, device=device)

            out.append(_Bucket(len(seqs), width, None if whole else t(src), t(slot), t(out_pos), t(out_slot)))
        return out


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        packed_layout: PackedLayout | None = None, **kwargs):
    """query `[1, H, T, D]`, key/value `[1, Hkv, T, D]`; returns `[1, T, H, D]` as transformers expects."""
    if packed_layout is None:  # not a packed call (e.g. a plain forward): behave like sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a batch of one packed row")
    drop = dropout if module.training else 0.0
    parts = []
    for b in packed_layout.buckets(query.device):
        def padded(x):  # [1, H, T, D] -> [S, H, L, D], zeros after each sequence's tokens
            rows = x.new_zeros(x.shape[1], b.count * b.width, x.shape[3])
            rows = rows.index_copy(1, b.slot, x[0] if b.src is None else x[0].index_select(1, b.src))
            return rows.view(x.shape[1], b.count, b.width, x.shape[3]).transpose(0, 1)

        o = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True, scale=scaling,
                                           dropout_p=drop, enable_gqa=True)
        parts.append((b, o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]).index_select(0, b.out_slot)))
    if len(parts) == 1 and parts[0][0].src is None:
        return parts[0][1][None], None  # the whole row in order: its tokens are already in packed order
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
    out = out.index_copy(0, torch.cat([b.out_pos for b, _ in parts]), torch.cat([o for _, o in parts]))
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


def reads_shared_prompts(config) -> bool:
    """Whether a model's attention can read a layout whose prompts are shared: packed SDPA
    gathers by index; flash-attention's varlen kernels take contiguous sequences only."""
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA


def training_attn_implementation(configured: str) -> str:
    """The implementation the trainer loads: flash-attention as configured, else packed SDPA."""
    return configured if configured.startswith("flash_attention") else PACKED_SDPA
