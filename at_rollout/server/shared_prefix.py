"""Decode attention that reads each prompt's KV once for all of its samples.

GRPO asks for `n` samples of every prompt, so a decode batch holds `n` rows per prompt that
share the prompt's keys and values. A plain KV cache repeats the prompt's KV for every row
and grows by concatenation, so each decode step copies the whole cache and then reads the
prompt part `n` times. Here a call's cache has two parts:

- the prefix: every prompt's KV from the prefill, once, left padded ([G, Hkv, P, D]);
- the generated tokens' KV, one row per sample, written in place into a buffer reserved for
  the call's longest sample ([rows, Hkv, capacity, D]; every live row has decoded the same
  number of tokens, so this part needs no mask).

`shared_prefix_attention` scores a step's queries against both parts and normalizes them
together (one softmax over the concatenated scores), which is the same attention as over the
repeated cache: a sample's tokens agree with the plain path to float rounding.

`decode_step` runs one step of a Llama-family model (Qwen2, Llama: the families `supports`)
through the model's own modules, without its forward's general-purpose plumbing (mask
building, output containers, kwargs routing), which cost ~15% of a CPU decode step at the
tiny world's sizes. Other models keep the plain cache and the model's forward.
"""
from __future__ import annotations

import sys

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

FAMILIES = ("qwen2", "llama")  # decoder layers: RMSNorm, rotary q/k/v/o attention, gated MLP, pre-norm residuals


class _GeneratedLayer(DynamicLayer):
    """One layer's generated-token KV: a reserved buffer, written in place, read as a view."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        rows, heads, _, dim = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((rows, heads, self.capacity, dim))
        self._v = value_states.new_empty((rows, heads, self.capacity, dim))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"decode cache holds {self.capacity} generated tokens; step {end} is past it")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        """Keep `rows`, copying only the tokens written so far (the rest of the buffer is free)."""
        if self.is_initialized:
            self._k, self._v = (self._compact(buf, rows) for buf in (self._k, self._v))
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def _compact(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = buf.new_empty((rows.numel(), *buf.shape[1:]))
        torch.index_select(buf[:, :, :self.length], 0, rows, out=out[:, :, :self.length])
        return out


class SharedPrefixCache(Cache):
    """The KV cache of one decode batch: the prompts' KV once, and each row's generated KV.

    `prefill` is the DynamicCache the prompts were prefilled into ([G, Hkv, P, D] per layer,
    left padded by `prompt_mask` [G, P]); `groups[r]` is the prompt of row r and `capacity`
    the most tokens any row will generate.
    """

    def __init__(self, prefill: DynamicCache, prompt_mask: torch.Tensor, groups: torch.Tensor, capacity: int):
        super().__init__(layers=[_GeneratedLayer(capacity) for _ in prefill.layers])
        self.prefix_keys = [layer.keys for layer in prefill.layers]
        self.prefix_values = [layer.values for layer in prefill.layers]
        self.prefix_len = int(prompt_mask.shape[1])
        # Additive mask over the prefix: -inf on each prompt's left padding.
        zero = torch.zeros((), dtype=self.prefix_keys[0].dtype, device=prompt_mask.device)
        self.prefix_bias = torch.where(prompt_mask.bool(), zero, float("-inf"))[:, None, None, :]
        self._set_rows(groups)

    def _set_rows(self, groups: torch.Tensor) -> None:
        """Row r sits at slot `slot[r]` of a [G x width] grid: its prompt's block, in row order."""
        self.groups = groups
        counts = torch.bincount(groups, minlength=self.prefix_bias.shape[0])
        self.width = max(1, int(counts.max()))
        first = torch.cumsum(counts, 0) - counts  # rows arrive grouped by prompt, in prompt order
        self.slot = groups * self.width + (torch.arange(groups.numel(), device=groups.device) - first[groups])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_len + self.layers[layer_idx].get_seq_length()

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (batch positions, ascending); prompts left with no row are dropped."""
        for layer in self.layers:
            layer.batch_select_indices(rows)
        groups = self.groups.index_select(0, rows)
        kept, groups = torch.unique(groups, return_inverse=True)  # sorted: rows stay grouped in order
        if kept.numel() < self.prefix_bias.shape[0]:
            self.prefix_keys = [k.index_select(0, kept) for k in self.prefix_keys]
            self.prefix_values = [v.index_select(0, kept) for v in self.prefix_values]
            self.prefix_bias = self.prefix_bias.index_select(0, kept)
        self._set_rows(groups)

    # Grid <-> rows: the prefix is read once per prompt by all of its rows' queries together.
    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, Hkv, g, X] -> [G, Hkv, width * g, X], zeros in empty slots."""
        rows, heads, g, last = x.shape
        grid = x.new_zeros((self.prefix_bias.shape[0] * self.width, heads, g, last)).index_copy_(0, self.slot, x)
        return grid.view(-1, self.width, heads, g, last).transpose(1, 2).reshape(-1, heads, self.width * g, last)

    def from_grid(self, grid: torch.Tensor, g: int) -> torch.Tensor:
        """[G, Hkv, width * g, X] -> [rows, Hkv, g, X]."""
        groups, heads, _, last = grid.shape
        rows = grid.view(groups, heads, self.width, g, last).transpose(1, 2).reshape(-1, heads, g, last)
        return rows.index_select(0, self.slot)


def shared_prefix_attention(query, key, value, layer: int, scaling: float, shared_prefix: SharedPrefixCache):
    """One decode step's attention in `layer`: query [rows, Hq, 1, D]; key/value: the rows'
    generated KV [rows, Hkv, t, D] (from `SharedPrefixCache.update`); the prefix comes from
    the cache. Returns [rows, 1, Hq, D]."""
    rows, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    g = q_heads // kv_heads
    q = query.reshape(rows, kv_heads, g, dim) * scaling
    prefix_k, prefix_v = shared_prefix.prefix_keys[layer], shared_prefix.prefix_values[layer]
    prefix_scores = torch.matmul(shared_prefix.to_grid(q), prefix_k.transpose(-1, -2)) + shared_prefix.prefix_bias
    scores = torch.cat([shared_prefix.from_grid(prefix_scores, g), torch.matmul(q, key.transpose(-1, -2))], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    prefix_p, own_p = probs.split([prefix_k.shape[2], key.shape[2]], dim=-1)
    out = shared_prefix.from_grid(torch.matmul(shared_prefix.to_grid(prefix_p), prefix_v), g)
    out = out + torch.matmul(own_p, value)  # [rows, Hkv, g, D]
    return out.reshape(rows, 1, q_heads, dim)


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, cache: SharedPrefixCache) -> torch.Tensor:
    """Logits [rows, vocab] for one token per row (`tokens`, `positions`: [rows]): the layer
    math of the model's own forward, in its order, over the shared-prefix cache."""
    inner = model.model
    rotate = sys.modules[type(inner.layers[0].self_attn).__module__].apply_rotary_pos_emb
    rows = tokens.shape[0]
    x = inner.embed_tokens(tokens)[:, None]  # [rows, 1, hidden]
    cos, sin = inner.rotary_emb(x, positions[:, None])
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        q, k = rotate(q, k, cos, sin)
        keys, values = cache.update(k, v, i)
        o = shared_prefix_attention(q, keys, values, i, attn.scaling, cache)
        x = x + attn.o_proj(o.reshape(rows, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))[:, -1].float()


def supports(model) -> bool:
    """A Qwen2 or Llama model with full causal attention in every layer (no sliding window)."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILIES or not hasattr(model, "lm_head"):
        return False
    if getattr(config, "use_sliding_window", getattr(config, "sliding_window", None) is not None):
        return False
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
