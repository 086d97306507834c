"""The server's request models and response shapes (SGLang 0.5.x field names).

Request bodies are pydantic models in strict mode with unknown fields forbidden, so a typo
or a wrong type is a 400 that names the field instead of a silently ignored knob. The
client never imports this module: its side of the wire is `at_rollout/protocol.py`, whose
`SAMPLING_FIELDS` must be exactly the fields `SamplingParamsIn` accepts (checked below).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..protocol import SAMPLING_FIELDS
from .generator import GeneratedSample, SamplingParams, SamplingParamsError

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
            "spaces_between_special_tokens": True, "regex": None, "json_schema": None, "ebnf": None, "logit_bias": None}


class SamplingParamsIn(_Strict):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: Optional[int] = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    # SGLang knobs this engine does not implement: accepted only at their neutral values.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    spaces_between_special_tokens: bool = True
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    logit_bias: Optional[Dict[str, float]] = None

    def to_params(self, where: str) -> SamplingParams:
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) != neutral:
                raise FieldError(f"{where}.{name}", f"{name}={getattr(self, name)!r} is not supported by this "
                                                    f"server (only the neutral value {neutral!r})")
        try:
            return SamplingParams(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                min_p=self.min_p, stop=self.stop or (), stop_token_ids=self.stop_token_ids or (),
                ignore_eos=self.ignore_eos, n=self.n, sampling_seed=self.sampling_seed,
                skip_special_tokens=self.skip_special_tokens, no_stop_trim=self.no_stop_trim,
            )
        except SamplingParamsError as err:
            raise FieldError(f"{where}.{err.field}", str(err)) from None


if tuple(SamplingParamsIn.model_fields) != SAMPLING_FIELDS:  # the client's declared knobs, one list
    raise ImportError(f"protocol.SAMPLING_FIELDS {SAMPLING_FIELDS} differs from SamplingParamsIn's fields "
                      f"{tuple(SamplingParamsIn.model_fields)}")


class GenerateRequest(_Strict):
    text: Optional[Union[str, List[str]]] = None
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    sampling_params: Optional[Union[SamplingParamsIn, List[SamplingParamsIn]]] = None
    return_logprob: Optional[Union[bool, List[bool]]] = None
    logprob_start_len: Optional[Union[int, List[int]]] = None
    top_logprobs_num: Optional[Union[int, List[int]]] = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: Optional[Union[str, List[str]]] = None
    log_metrics: bool = True


class EmptyRequest(_Strict):
    pass


class PauseRequest(_Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class WeightUpdateSessionRequest(_Strict):
    selector: Literal["all", "target"] = "all"  # SGLang's runners; this server has one model


class UpdateWeightVersionRequest(_Strict):
    new_version: str
    abort_all_requests: bool = False


class UpdateWeightsFromTensorRequest(_Strict):
    serialized_named_tensors: List[str]
    load_format: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None


class InitWeightsUpdateGroupRequest(_Strict):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedRequest(_Strict):
    names: List[str]
    dtypes: List[str]
    shapes: List[List[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    load_format: Optional[str] = None


class DestroyWeightsUpdateGroupRequest(_Strict):
    group_name: str = "weight_update_group"


class MemoryOccupationRequest(_Strict):
    tags: Optional[List[str]] = None



class FieldError(ValueError):
    """A request error that names the offending field (dotted path, list indices in brackets)."""

    def __init__(self, field: Optional[str], message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


def field_error(err: ValidationError) -> FieldError:
    """The most specific pydantic error, with union-branch names dropped from its location."""
    errors = err.errors()
    best = max(errors, key=lambda e: len(e.get("loc", ())))
    if any(e["type"] == "json_invalid" for e in errors):
        return FieldError(None, f"malformed JSON: {errors[0]['msg']}")
    if any(e["type"] == "extra_forbidden" for e in errors):
        best = max((e for e in errors if e["type"] == "extra_forbidden"), key=lambda e: len(e["loc"]))
    parts: list[str] = []
    for part in best.get("loc", ()):
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue  # a union branch such as 'list[int]' or 'SamplingParamsIn'
        else:
            parts.append(("." if parts else "") + part)
    name = "".join(parts) or None
    what = "unknown field" if best["type"] == "extra_forbidden" else best["msg"]
    return FieldError(name, f"{name or 'body'}: {what}")



# ---------------------------------------------------------------- responses
def sample_to_json(sample: GeneratedSample, rid: str, return_logprob: bool, tokenizer=None, text_in_logprobs=False,
                   weight_version: Optional[str] = None) -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "id": rid,
        "finish_reason": sample.finish_reason,
        "prompt_tokens": sample.prompt_tokens,
        "completion_tokens": len(sample.output_ids),
        "cached_tokens": 0,
        "weight_version": weight_version,
    }
    if return_logprob:
        texts = [None] * len(sample.output_ids)
        if text_in_logprobs and tokenizer is not None:
            texts = [tokenizer.decode([t]) for t in sample.output_ids]
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, s] for lp, t, s in zip(sample.logprobs, sample.output_ids, texts)]
    out: Dict[str, Any] = {"output_ids": sample.output_ids, "meta_info": meta}
    if sample.text is not None:
        out["text"] = sample.text
    return out


# ---------------------------------------------------------------- big strings
def lift_long_strings(body: bytes, min_len: int = 1 << 16) -> tuple[bytes, Dict[str, memoryview]]:
    """Cut long JSON strings without escapes out of `body` before parsing it.

    A weight update is a few hundred MB of base64 inside JSON strings; parsing them would
    copy and UTF-8-check every byte only for base64 to read them again. Each such string
    is replaced by a short unique placeholder string and returned as a view into `body`.
    The skeleton is still parsed and validated as usual; the lifted views are checked by
    the base64 decoder. Malformed JSON is left for the parser to report.
    """
    import secrets

    tag = f"\u0000{secrets.token_hex(8)}:"
    view = memoryview(body)
    pieces, lifted = [], {}
    pos = i = 0
    while True:
        start = body.find(b'"', i)
        if start < 0:
            break
        end = body.find(b'"', start + 1)
        while end > 0:  # skip escaped quotes: an odd run of backslashes before the quote
            k = end - 1
            while body[k] == 0x5C:
                k -= 1
            if (end - 1 - k) % 2 == 0:
                break
            end = body.find(b'"', end + 1)
        if end < 0:
            break
        if end - start - 1 >= min_len and body.find(b"\\", start + 1, end) < 0:
            key = f"{tag}{len(lifted)}"
            pieces += [view[pos:start], json_string(key)]
            lifted[key] = view[start + 1:end]
            pos = end + 1
        i = end + 1
    if not lifted:
        return body, {}
    pieces.append(view[pos:])
    return b"".join(pieces), lifted


def json_string(text: str) -> bytes:
    import json

    return json.dumps(text).encode()
