"""The wire format shared by our server, our client and SGLang (fields as in SGLang 0.5.x).

Request bodies are pydantic models in strict mode with unknown fields forbidden, so a
typo or a wrong type is a 400 that names the field instead of a silently ignored knob.
Tensors travel as safetensors blobs (`tensor_codec.py`), base64 in JSON or, to our server, as a
raw body: nothing received is unpickled.

Field names follow SGLang's `python/sglang/srt/managers/io_struct.py` (GenerateReqInput,
UpdateWeightsFromTensorReqInput, InitWeightsUpdateGroupReqInput,
UpdateWeightsFromDistributedReqInput, ...) and `sampling/sampling_params.py`, 0.5.15.post1
through 0.5.23. What the client sends and reads is declared below (`SGLANG_REQUESTS`, the
`*_READ` tuples) and enforced by the client, so `tests/test_sglang_contract.py` checks the
very sets the code uses against each SGLang wheel's own source.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .generator import Sample, SamplingParams, SamplingParamsError

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype strings: `torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


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


# ---------------------------------------------------------------- the client's contract with SGLang
# route -> (SGLang's request struct in io_struct.py, the fields the client may send)
SGLANG_REQUESTS: Dict[str, tuple] = {
    "/generate": ("GenerateReqInput", ("input_ids", "sampling_params", "return_logprob")),
    "/pause_generation": ("PauseGenerationReqInput", ("mode",)),
    "/continue_generation": ("ContinueGenerationReqInput", ()),
    "/release_memory_occupation": ("ReleaseMemoryOccupationReqInput", ("tags",)),
    "/resume_memory_occupation": ("ResumeMemoryOccupationReqInput", ("tags",)),
    "/init_weights_update_group": ("InitWeightsUpdateGroupReqInput",
                                   ("master_address", "master_port", "rank_offset", "world_size", "group_name",
                                    "backend")),
    "/destroy_weights_update_group": ("DestroyWeightsUpdateGroupReqInput", ("group_name",)),
    "/update_weights_from_distributed": ("UpdateWeightsFromDistributedReqInput",
                                         ("names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version")),
    "/update_weights_from_tensor": ("UpdateWeightsFromTensorReqInput",
                                    ("serialized_named_tensors", "load_format", "flush_cache", "weight_version")),
    "/update_weight_version": ("UpdateWeightVersionReqInput", ("new_version", "abort_all_requests")),
    # SGLang 0.5.21 and later (the weight-update session; see SESSION_SINCE)
    "/begin_weight_update": ("BeginWeightUpdateReqInput", ()),
    "/end_weight_update": ("EndWeightUpdateReqInput", ()),
}
SESSION_ROUTES = ("/begin_weight_update", "/end_weight_update")
SESSION_SINCE = "0.5.21"  # the first SGLang with the session; it refuses updates outside one
# route -> method, for the calls that send no body (the get_* forms: SGLang before /model_info)
SGLANG_BODYLESS = {"/health_generate": "GET", "/model_info": "GET", "/get_model_info": "GET", "/server_info": "GET",
                   "/get_server_info": "GET", "/flush_cache": "POST"}
OUTPUT_READ = ("output_ids", "meta_info", "text")  # each /generate output
META_INFO_READ = ("finish_reason", "prompt_tokens", "output_token_logprobs", "weight_version")
FINISH_REASON_READ = ("type", "matched")
MODEL_INFO_READ = ("weight_version",)  # ours also says "dtype" and "tensor_update_bodies"
SERVER_INFO_READ = ("version",)  # ours says "weight_update_session" instead
UPDATE_ANSWER_READ = ("success", "message")  # the weight endpoints' JSON answer


def sent_fields(route: str, fields) -> None:
    """A programming error if the client is about to send a field it has not declared."""
    extra = sorted(set(fields) - set(SGLANG_REQUESTS[route][1]))
    if extra:
        raise ValueError(f"{route}: field(s) {extra} are not in protocol.SGLANG_REQUESTS[{route!r}]")


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


SAMPLING_FIELDS = tuple(SamplingParamsIn.model_fields)  # the sampling knobs a client may pass


# ---------------------------------------------------------------- responses
def sample_to_json(sample: Sample, rid: str, return_logprob: bool, tokenizer=None, text_in_logprobs=False,
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
