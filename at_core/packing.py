"""Packing: prompt+response sequences concatenated without padding into token-budget micro-batches.

AutoThink batches mix no-think answers (tens of tokens) with think traces (thousands), so
padding to the longest sequence wastes most of the compute; packing keeps every token
useful. Position ids restart at 0 for each sequence and attention runs per sequence
(`at_core/attention.py`: the sequences' boundaries go to SDPA or flash-attention's varlen
kernel, never a dense block-diagonal mask), so sequences never attend to each other.
GRPO samples several responses per prompt; with packed SDPA they can share one copy of
the prompt in a micro-batch (`share_prompts`), which the model then computes once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Sequence, Tuple

import torch

from at_core.attention import PACKED_SDPA, PackedLayout, reads_shared_prompts  # importing it registers the packed attention
from at_core.logprob import lm_head_token_logprobs


@dataclass
class Example:
    """One training example: a prompt and one of its sampled responses, with everything the
    update needs (a generated response itself is a `Sample`)."""

    prompt_ids: List[int]
    response_ids: List[int]
    advantage: float | List[float] = 0.0  # one per response, or one per response token
    old_logprobs: List[float] | None = None  # per response token; None: on-policy (use detached current)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def plan_micro_batches(lengths: Sequence[int], token_budget: int,
                       prompts: Sequence[Tuple[Hashable, int]] | None = None) -> List[List[int]]:
    """First-fit decreasing bin packing of sequence indices under `token_budget` tokens.

    A sequence longer than the budget gets a micro-batch of its own. With `prompts` (each
    sequence's prompt key and prompt length), bins share prompts as `pack` does: a sequence
    costs only its response in a bin that already holds its prompt, and such a bin is tried
    first. Deterministic: ties keep the input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    room: List[int] = []
    held: List[set] = []  # prompt keys in each bin
    for i in order:
        key, plen = prompts[i] if prompts is not None else (None, 0)
        mine = [b for b in range(len(bins)) if key in held[b]] if prompts is not None else []
        for b in mine + [b for b in range(len(bins)) if b not in mine]:
            cost = lengths[i] - plen if b in mine else lengths[i]
            if cost <= room[b]:
                bins[b].append(i)
                room[b] -= cost
                held[b].add(key)
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
            held.append({key})
    return [sorted(b) for b in bins]


def plan_examples(examples: Sequence[Example], token_budget: int, share_prompts: bool = False) -> List[List[int]]:
    """`plan_micro_batches` over examples; with `share_prompts`, a prompt counts once per bin,
    as `pack(..., share_prompts=True)` lays it out."""
    prompts = [(tuple(r.prompt_ids), len(r.prompt_ids)) for r in examples] if share_prompts else None
    return plan_micro_batches([r.length for r in examples], token_budget, prompts)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logit_index: torch.Tensor  # [N] positions whose logits predict the response tokens
    targets: torch.Tensor  # [N] the response tokens
    seq_of_token: torch.Tensor  # [N] which example (index into `examples`) each target belongs to
    examples: List[Example]
    layout: PackedLayout  # where each sequence's prompt and response sit (packed attention reads it)
    cu_seqlens: torch.Tensor | None  # [S + 1] int32 boundaries for varlen kernels; None when prompts are shared
    max_len: int


def pack(examples: Sequence[Example], device: torch.device | str = "cpu", share_prompts: bool = False) -> PackedBatch:
    """Concatenate `examples` into one row; with `share_prompts`, rollouts of the same prompt
    use one copy of it (their responses follow it elsewhere in the row, positions continuing
    from the prompt's end), so the model computes each prompt once per micro-batch."""
    ids: List[int] = []
    pos: List[int] = []
    logit_index: List[int] = []
    targets: List[int] = []
    owner: List[int] = []
    spans: Dict[Tuple[int, ...], Tuple[int, int]] = {}
    prompts, responses, owns = [], [], []
    for k, r in enumerate(examples):
        p = len(r.prompt_ids)
        key = tuple(r.prompt_ids)
        owns.append(not (share_prompts and key in spans))
        if owns[-1]:
            spans[key] = (len(ids), p)
            ids.extend(r.prompt_ids)
            pos.extend(range(p))
        prompts.append(spans[key])
        start, n = len(ids), len(r.response_ids)
        responses.append((start, n))
        ids.extend(r.response_ids)
        pos.extend(range(p, p + n))
        if n:  # logits at position t predict token t + 1; the first response token is read at the prompt's end
            logit_index.append(spans[key][0] + p - 1)
            logit_index.extend(range(start, start + n - 1))
        targets.extend(r.response_ids)
        owner.extend([k] * n)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    layout = PackedLayout(prompts, responses, owns, len(ids))
    lens = layout.lengths()
    cu = None if layout.shared else torch.tensor([0] + lens, dtype=torch.int32, device=device).cumsum(
        0, dtype=torch.int32)
    return PackedBatch(t(ids)[None], t(pos)[None], t(logit_index), t(targets), t(owner), list(examples), layout, cu,
                       max(lens, default=0))


def packed_logprobs(model, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False,
                    chunk: int = 4096):
    """Per-token log-probs (and entropies) of the response tokens of a packed micro-batch.

    Only the response positions go through the lm_head, in the fused kernel, chunk by chunk,
    so the `[T, V]` logits of the micro-batch never exist at once; the entropy is
    differentiable (the entropy bonus trains through it). `model` is an HF causal LM (or the
    DeepSpeed engine's module): calling its submodules keeps ZeRO-3's gather hooks in play.
    """
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if batch.layout.shared and not reads_shared_prompts(model.config):
        raise ValueError(f"a packed batch with shared prompts needs attn_implementation={PACKED_SDPA!r}, not "
                         f"{getattr(model.config, '_attn_implementation', None)!r} (varlen kernels take contiguous "
                         f"sequences only)")
    varlen = dict(packed_layout=batch.layout)  # read by packed_sdpa; ignored by other implementations
    if batch.cu_seqlens is not None:  # flash-attention's varlen kernels
        varlen.update(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_len,
                      max_length_k=batch.max_len)
    hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                      **varlen).last_hidden_state
    hidden = hidden[0].index_select(0, batch.logit_index)
    out = lm_head_token_logprobs(model.lm_head, hidden, batch.targets, temperature, chunk,
                                 return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    return logp, ent


class PackedPolicy(torch.nn.Module):
    """Wraps an HF causal LM so that `engine(batch)` returns packed response log-probs.

    Going through the DeepSpeed engine's own forward (rather than calling submodules) is
    what keeps ZeRO-3's per-micro-batch bookkeeping right: its gradient accumulation counts
    micro-steps at the start of each engine forward. `self.lm` keeps the HF parameter names
    for export and weight sync.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False, chunk: int = 4096):
        return packed_logprobs(self.lm, batch, temperature, with_entropy=with_entropy, chunk=chunk)
