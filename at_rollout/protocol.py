"""The wire format the client speaks to our server and to SGLang (fields as in SGLang 0.5.x).

Pure Python (no torch, no pydantic): what the client sends and reads, and how a
`/generate` request is built and its answer parsed into `Sample`s. Field names follow
SGLang's `python/sglang/srt/managers/io_struct.py` (GenerateReqInput,
UpdateWeightsFromTensorReqInput, InitWeightsUpdateGroupReqInput,
UpdateWeightsFromDistributedReqInput, ...) and `sampling/sampling_params.py`, 0.5.15.post1
through 0.5.23. What the client sends and reads is declared here (`SGLANG_REQUESTS`, the
`*_READ` tuples) and enforced by the client, so `tests/test_sglang_contract.py` checks the
very sets the code uses against each SGLang wheel's own source. The server's strict request
models (pydantic) are `at_rollout/server/models.py`; they accept exactly `SAMPLING_FIELDS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

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


# The sampling knobs a client may pass (SGLang's SamplingParams; our server accepts the ones
# it does not implement only at their neutral values).
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
                   "n", "sampling_seed", "skip_special_tokens", "no_stop_trim", "frequency_penalty",
                   "presence_penalty", "repetition_penalty", "min_new_tokens", "spaces_between_special_tokens",
                   "regex", "json_schema", "ebnf", "logit_bias")


# ---------------------------------------------------------------- /generate, built and parsed
@dataclass
class Sample:
    """One generated response from /generate, prompt-major order, `n` per prompt."""

    prompt_index: int
    output_ids: list[int]
    logprobs: Optional[list[float]]  # only when asked for (return_logprob)
    finish_reason: str  # stop | length | abort
    matched: Any = None  # the stop token id or stop string, when finish_reason == "stop"
    text: Optional[str] = None
    prompt_tokens: int = 0
    meta_info: dict = field(default_factory=dict, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def weight_version(self) -> Optional[str]:
        """The version of the weights the server had when it answered (SGLang's meta_info)."""
        return self.meta_info.get(META_INFO_READ[3])


def generate_body(input_ids: Sequence[Sequence[int]], sampling_params: Mapping | Sequence[Mapping],
                  return_logprob: bool) -> tuple[dict, list[int]]:
    """The /generate body for a batch of prompts, and the number of samples each prompt gets."""
    per_prompt = isinstance(sampling_params, (list, tuple))
    for sp in sampling_params if per_prompt else [sampling_params]:
        unknown = sorted(set(sp) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"sampling_params: unknown key(s) {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    body = {"input_ids": [list(map(int, p)) for p in input_ids], "return_logprob": bool(return_logprob),
            "sampling_params": list(sampling_params) if per_prompt else dict(sampling_params)}
    sent_fields("/generate", body)
    ns = [int((sampling_params[i] if per_prompt else sampling_params).get("n", 1)) for i in range(len(input_ids))]
    return body, ns


def parse_sample(out: dict, prompt_index: int, return_logprob: bool) -> Sample:
    """One /generate output (ours or SGLang's) as a Sample, reading only the declared keys."""
    ids_key, meta_key, text_key = OUTPUT_READ
    reason_key, prompt_key, logprobs_key, _ = META_INFO_READ
    type_key, matched_key = FINISH_REASON_READ
    meta = out.get(meta_key, {})
    reason = meta.get(reason_key) or {}
    lps = [float(x[0]) for x in meta.get(logprobs_key, [])] if return_logprob else None
    return Sample(prompt_index=prompt_index, output_ids=list(out.get(ids_key, [])), logprobs=lps,
                  finish_reason=reason.get(type_key, "abort"), matched=reason.get(matched_key),
                  text=out.get(text_key), prompt_tokens=int(meta.get(prompt_key, 0)), meta_info=meta)


def version_tuple(text: Optional[str]) -> Optional[tuple]:
    """`0.5.15.post1` -> (0, 5, 15); None for a missing or placeholder (`0.0.0.dev0`) version."""
    parts = []
    for piece in str(text or "").split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if len(parts) == 3 and any(parts) else None
