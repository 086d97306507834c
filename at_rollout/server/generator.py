"""In-process batched sampling for a Hugging Face causal LM (the engine behind our server).

Every prompt of a call is prefilled once and all rows then decode together (left padding,
explicit position ids). The decode steps read each prompt's KV once for its `n` samples
(`shared_prefix.py`; models it does not cover repeat the cache per row). Rows that finish
leave the batch, so a call costs what its longest sample costs, not the sum.

Two definitions the trainer relies on live here:

- Log-probs are `log_softmax(logits / T)[token]` in fp32, taken BEFORE top-p/top-k/min-p
  truncation, with `T = logprob_temperature(temperature)` (greedy, T=0, reports T=1). The
  trainer recomputes exactly this with `at_core.logprob.token_logprobs(logits, targets,
  logprob_temperature(t))`.
- Determinism: every row draws its uniforms from its own `torch.Generator`, seeded from
  `(sampling_seed, request item, sample index)`, and samples by inverse CDF. A sample
  therefore depends on its request and seed, not on what else shares the batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from at_rollout.server.shared_prefix import SharedPrefixCache, decode_step
from at_rollout.server.shared_prefix import supports as supports_shared_prefix

GREEDY_EPS = 1e-6  # temperatures below this sample greedily (SGLang's convention)
_UNIFORM_CHUNK = 256  # uniforms drawn per row at a time (one generator call per row per chunk)


def logprob_temperature(temperature: float) -> float:
    """The temperature log-probs are reported at: `temperature`, or 1.0 for greedy decoding."""
    return float(temperature) if temperature > GREEDY_EPS else 1.0


@dataclass
class SamplingParams:
    """The subset of SGLang's sampling parameters this engine implements."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # as in SGLang: also ignores stop_token_ids, keeps stop strings
    n: int = 1
    sampling_seed: Optional[int] = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids or ())
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1 (off) or >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("n", self.n >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPS


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class GeneratedSample:
    """One generated sequence. `finish_reason` uses SGLang's shapes."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict
    prompt_tokens: int
    text: Optional[str] = None
    prompt_index: int = 0
    sample_index: int = 0


def row_seed(sampling_seed: int, item: int, sample: int) -> int:
    """A 63-bit generator seed for one row, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{sampling_seed}:{item}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class _Rows:
    """Per-row state of one decode batch (index = row id, fixed for the whole call)."""

    item: list[int] = field(default_factory=list)  # position in this call's prompt list
    key: list[int] = field(default_factory=list)  # seed key (position in the caller's request)
    sample: list[int] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    limit: list[int] = field(default_factory=list)


class Generator:
    """Batched sampling with a KV cache for an HF causal LM; see the module docstring."""

    def __init__(self, model, tokenizer=None, *, eos_token_ids: Optional[Sequence[int]] = None,
                 max_batch_rows: int = 1024, seed: Optional[int] = None, shared_prefix: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.context_len = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.eos_token_ids = tuple(sorted(set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))))
        self._seeds = random.Random(seed)  # seeds for rows whose request gave no sampling_seed
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        self._cache_kw = _cache_keyword(model)
        self._shared_prefix = shared_prefix and supports_shared_prefix(model)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "auto", device: str = "auto",
                        attn_implementation: str = "sdpa", **kwargs) -> "Generator":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        torch_dtype = resolve_dtype(dtype, device)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, attn_implementation=attn_implementation
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, seed_keys: Optional[Sequence[int]] = None,
                 should_abort: Optional[Callable[[], bool]] = None) -> list[GeneratedSample]:
        """Samples for every prompt, prompt-major (`n` consecutive samples per prompt).

        `params` is one SamplingParams for all prompts or one per prompt. `seed_keys` (default
        0, 1, ...) is each prompt's index in its own request: the server merges requests into
        one call and passes the original indices so merging does not change any sample.
        `should_abort` is called once per decode step (it may block, e.g. while generation is
        paused); when it returns True the unfinished rows end with finish reason `abort`.
        """
        prompts = [list(map(int, p)) for p in prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.context_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {self.context_len}")
        keys = list(seed_keys) if seed_keys is not None else list(range(len(prompts)))
        if len(keys) != len(prompts):
            raise ValueError(f"got {len(keys)} seed keys for {len(prompts)} prompts")
        results: list[Optional[list[GeneratedSample]]] = [None] * len(prompts)
        for wave in self._waves(plist):
            samples = self._run([prompts[i] for i in wave], [plist[i] for i in wave], [keys[i] for i in wave],
                                should_abort)
            for i, group in zip(wave, samples):
                results[i] = group
        return [s for group in results for s in group]

    # ------------------------------------------------------------------ internals
    def _waves(self, plist: list[SamplingParams]) -> list[list[int]]:
        """Split request items into batches of at most `max_batch_rows` rows (an item never splits)."""
        waves, cur, rows = [], [], 0
        for i, p in enumerate(plist):
            if cur and rows + p.n > self.max_batch_rows:
                waves.append(cur)
                cur, rows = [], 0
            cur.append(i)
            rows += p.n
        if cur:
            waves.append(cur)
        return waves

    def _run(self, prompts, plist, keys, should_abort) -> list[list[GeneratedSample]]:
        dev = self.device
        rows = _Rows()
        expand = []
        for k, (prompt, p) in enumerate(zip(prompts, plist)):
            for j in range(p.n):
                rows.item.append(k)
                rows.key.append(keys[k])
                rows.sample.append(j)
                rows.params.append(p)
                rows.limit.append(min(p.max_new_tokens, self.context_len - len(prompt)))
                expand.append(k)
        n_rows = len(rows.params)
        samples_out: list[list[Optional[GeneratedSample]]] = [[None] * p.n for p in plist]

        # Prefill every prompt once (left padded), then repeat its cache for its n rows.
        from transformers import DynamicCache

        max_len = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), max_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
        for k, p in enumerate(prompts):
            ids[k, max_len - len(p):] = torch.tensor(p)
            mask[k, max_len - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)  # filled in place by every forward
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        index = torch.tensor(expand, device=dev)
        limit = max(rows.limit)
        if self._shared_prefix and limit > 0:
            cache = SharedPrefixCache(cache, mask, index, capacity=limit)
        elif len(expand) != len(prompts) or expand != list(range(len(prompts))):
            cache.batch_select_indices(index)
        logits = out.logits[:, -1].float().index_select(0, index)
        mask = mask.index_select(0, index)
        next_pos = pos[:, -1].index_select(0, index) + 1
        del out

        # Per-row sampling tensors.
        temps = torch.tensor([p.temperature for p in rows.params], dtype=torch.float32, device=dev)
        greedy = temps <= GREEDY_EPS
        lp_temp = torch.where(greedy, torch.ones_like(temps), temps)
        top_p = torch.tensor([p.top_p for p in rows.params], dtype=torch.float32, device=dev)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else 0 for p in rows.params], dtype=torch.long, device=dev)
        min_p = torch.tensor([p.min_p for p in rows.params], dtype=torch.float32, device=dev)
        filtered = (~greedy) & ((top_p < 1) | (top_k > 0) | (min_p > 0))
        stop_mat = _stop_matrix(rows.params, self.eos_token_ids).to(dev)
        limits = torch.tensor(rows.limit, dtype=torch.long, device=dev)
        gens = [None if p.greedy else torch.Generator().manual_seed(self._row_seed(p, key, j))
                for p, key, j in zip(rows.params, rows.key, rows.sample)]
        uniforms = torch.zeros((n_rows, _UNIFORM_CHUNK), dtype=torch.float64)
        stop_rows = {r: [] for r in range(n_rows) if rows.params[r].stop}
        max_stop_chars = {r: max(len(s) for s in rows.params[r].stop) for r in stop_rows}

        active = torch.arange(n_rows, device=dev)  # row ids of the current batch, in batch order
        live = limits > 0  # rows still generating; finished rows leave the batch in groups
        finish: dict[int, dict] = {r: {"type": "length", "length": 0} for r in range(n_rows) if rows.limit[r] <= 0}
        hist_rows, hist_tok, hist_lp = [], [], []
        step = 0
        all_greedy = bool(greedy.all())
        while True:
            if not bool(live.any()) or (should_abort is not None and should_abort()):
                break
            if step % _UNIFORM_CHUNK == 0 and not all_greedy:
                for r in active[live].tolist():
                    if gens[r] is not None:
                        uniforms[r] = torch.rand(_UNIFORM_CHUNK, generator=gens[r], dtype=torch.float64)
            u = None if all_greedy else uniforms[active.cpu(), step % _UNIFORM_CHUNK].to(dev)
            tok = _sample(logits, temps[active], greedy[active], filtered[active], top_p[active], top_k[active],
                          min_p[active], u)
            scaled = logits / lp_temp[active][:, None]
            lp = scaled.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
            step += 1
            if bool(live.all()):
                hist_rows.append(active), hist_tok.append(tok), hist_lp.append(lp)
            else:
                hist_rows.append(active[live]), hist_tok.append(tok[live]), hist_lp.append(lp[live])

            # Finished rows: stop token, length, stop string.
            hit_stop = (tok[:, None] == stop_mat[active]).any(1)
            done = live & (hit_stop | (limits[active] <= step))
            if stop_rows:
                done = self._check_stop_strings(active, tok, live, done, stop_rows, max_stop_chars, finish, rows)
            if bool(done.any()):
                for b in done.nonzero().flatten().tolist():
                    r = int(active[b])
                    if r not in finish:  # length first, as SGLang checks it
                        finish[r] = ({"type": "length", "length": step} if step >= rows.limit[r]
                                     else {"type": "stop", "matched": int(tok[b])})
                live = live & ~done
                dead = int((~live).sum())
                if dead == live.numel():
                    break
                # Drop finished rows once they are an eighth of the batch (a cache copy each time).
                if dead * 8 >= live.numel():
                    keep = live.nonzero().flatten()
                    cache.batch_select_indices(keep)
                    active, tok, mask, next_pos, live = active[keep], tok[keep], mask[keep], next_pos[keep], live[keep]
            logits, mask = self._decode_step(tok, mask, next_pos, cache)
            next_pos = next_pos + 1

        for r in active[live].tolist():
            finish.setdefault(r, {"type": "abort", "message": "generation aborted (pause_generation)"})
        return self._collect(rows, hist_rows, hist_tok, hist_lp, finish, prompts, samples_out)

    def _decode_step(self, tok, mask, next_pos, cache):
        """One token per row through the model. Over a SharedPrefixCache, `decode_step` (no
        mask: the prefix carries its padding, generated tokens have none); otherwise the model's
        forward, with the plain cache grown by one column of mask. Returns (logits, mask)."""
        if isinstance(cache, SharedPrefixCache):
            return decode_step(self.model, tok, next_pos, cache), mask
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        with self._decode_attention():
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1].float(), mask

    def _decode_attention(self):
        """SDPA's kernel for one-token decode steps over the plain cache: on CPUs the math
        kernel (two small matmuls per head), which beat the flash kernel's blocking at one
        query row by ~15% of a rollout (docs/tiny_world.md); elsewhere SDPA's own choice."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        return sdpa_kernel(SDPBackend.MATH)

    def _row_seed(self, p: SamplingParams, item: int, sample: int) -> int:
        if p.sampling_seed is None:
            return self._seeds.getrandbits(63)
        return row_seed(p.sampling_seed, item, sample)

    def _check_stop_strings(self, active, tok, live, done, stop_rows, max_stop_chars, finish, rows):
        toks = tok.tolist()
        for b, r in enumerate(active.tolist()):
            if r not in stop_rows or not bool(live[b]):
                continue
            hist = stop_rows[r]
            hist.append(toks[b])
            if bool(done[b]):
                continue
            # A token is at least one byte; 4 bytes per char bounds the window for any stop string.
            tail = self.tokenizer.decode(hist[-(4 * max_stop_chars[r] + 4):], skip_special_tokens=False)
            for s in rows.params[r].stop:
                if s in tail:
                    finish[r] = {"type": "stop", "matched": s}
                    done[b] = True
                    break
        return done

    def _collect(self, rows, hist_rows, hist_tok, hist_lp, finish, prompts, samples_out):
        if hist_rows:
            all_rows = torch.cat(hist_rows).cpu()
            order = torch.sort(all_rows, stable=True).indices
            toks = torch.cat(hist_tok).cpu()[order].tolist()
            lps = torch.cat(hist_lp).float().cpu()[order].tolist()
            counts = torch.bincount(all_rows, minlength=len(rows.params)).tolist()
        else:
            toks, lps, counts = [], [], [0] * len(rows.params)
        start = 0
        for r, cnt in enumerate(counts):
            p = rows.params[r]
            k = rows.item[r]
            ids = toks[start:start + cnt]
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
                matched = finish[r].get("matched")
                if isinstance(matched, str) and not p.no_stop_trim and matched in text:
                    text = text[: text.index(matched)]
            samples_out[k][rows.sample[r]] = GeneratedSample(
                output_ids=ids, logprobs=lps[start:start + cnt], finish_reason=finish[r],
                prompt_tokens=len(prompts[k]), text=text, prompt_index=rows.key[r], sample_index=rows.sample[r],
            )
            start += cnt
        return samples_out


def _sample(logits, temps, greedy, filtered, top_p, top_k, min_p, u) -> torch.Tensor:
    """One token per row: argmax for greedy rows, inverse-CDF with the row's uniform otherwise."""
    tok = logits.argmax(dim=-1)
    sampling = ~greedy
    if not bool(sampling.any()):
        return tok
    plain = sampling & ~filtered
    if bool(plain.any()):
        idx = plain.nonzero().flatten()
        probs = torch.softmax(logits[idx] / temps[idx, None], dim=-1)
        tok[idx] = _inverse_cdf(probs, u[idx])
    if bool(filtered.any()):
        idx = filtered.nonzero().flatten()
        probs = torch.softmax(logits[idx] / temps[idx, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # SGLang's rule: all three masks are computed on the same (untruncated) sorted probs.
        ranks = torch.arange(sorted_p.shape[-1], device=logits.device)
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[idx, None]
        drop |= (top_k[idx, None] > 0) & (ranks[None, :] >= top_k[idx, None])
        drop |= sorted_p < min_p[idx, None] * sorted_p[:, :1]
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        tok[idx] = order.gather(1, _inverse_cdf(sorted_p, u[idx])[:, None]).squeeze(1)
    return tok


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]; never a zero-probability entry."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    bad = probs.gather(1, choice[:, None]).squeeze(1) <= 0
    if bool(bad.any()):  # u*total rounded onto the top of the cdf: take the last positive entry
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
        choice = torch.where(bad, last, choice)
    return choice


def _stop_matrix(plist: list[SamplingParams], eos: Sequence[int]) -> torch.Tensor:
    """[rows, K] token ids that end each row (-1 padded): eos + stop_token_ids unless ignore_eos."""
    sets = [() if p.ignore_eos else tuple(sorted(set(eos) | set(p.stop_token_ids))) for p in plist]
    width = max([len(s) for s in sets] + [1])
    mat = torch.full((len(plist), width), -1, dtype=torch.long)
    for r, s in enumerate(sets):
        if s:
            mat[r, : len(s)] = torch.tensor(s)
    return mat


def _cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers 5.x renamed it
    (`past_key_values` warns and goes in 5.40); older models and releases only know the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 matmuls are slow there) and bf16 on GPUs."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"dtype must be auto or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]

