"""The rollout server's FastAPI application: SGLang's endpoints over a `Generator`.

Handlers only validate and enqueue; generation runs on the scheduler's thread and weight
updates on worker threads, so the event loop always answers (health checks included).
Every request body is size-limited while it streams in and parsed in strict mode; an
error is a JSON body with `message` and the offending `field`.

Weight updates follow SGLang 0.5.21+: they are accepted only inside a weight-update session
(`/begin_weight_update` ... `/end_weight_update`); outside one an update is refused before
anything is received, so CI drives the very call sequence real SGLang needs.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect
from pydantic import ValidationError

from .generator import Generator, SamplingParams
from .models import (
    DestroyWeightsUpdateGroupRequest, EmptyRequest, FieldError, GenerateRequest, InitWeightsUpdateGroupRequest,
    MemoryOccupationRequest, PauseRequest, SamplingParamsIn, UpdateWeightsFromDistributedRequest,
    UpdateWeightsFromTensorRequest, UpdateWeightVersionRequest, WeightUpdateSessionRequest, field_error,
    lift_long_strings, sample_to_json,
)
from .. import tensor_codec
from ..tensor_codec import dtype_name
from .scheduler import Scheduler
from .weights import ServedWeights

log = logging.getLogger("at_rollout.server")
PUBLIC_PATHS = ("/health", "/health_generate")
BINARY = "application/octet-stream"  # a weight update whose body is the safetensors blob itself
MB = 1 << 20


class ServerState:
    def __init__(self, generator: Generator, *, model_path: str, api_key: Optional[str] = None,
                 max_request_bytes: int = 64 * MB, max_weights_request_bytes: int = 16384 * MB,
                 weight_update_timeout_s: float = 300.0, batch_window_s: float = 0.002):
        self.generator = generator
        self.model_path = model_path
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.max_weights_request_bytes = max_weights_request_bytes
        self.scheduler = Scheduler(generator, batch_window_s=batch_window_s).start()
        self.weights = ServedWeights(generator.model, self.scheduler.model_lock, weight_update_timeout_s,
                                     max_weights_request_bytes)
        self.vocab_size = int(generator.model.get_input_embeddings().weight.shape[0])
        self.session_open = False  # a weight-update session (see the module note)

    def require_session(self, route: str) -> None:
        if not self.session_open:
            raise FieldError(None, f"{route} must run between /begin_weight_update and /end_weight_update "
                                   "(no weight-update session is open); nothing was received")


class FastJSON(JSONResponse):
    """A response rendered by json.dumps directly: FastAPI's default encoder visits every
    token of every sample in Python first, which costs as much as generating them."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def _error(err: FieldError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={
        "object": "error", "success": False, "message": str(err), "field": err.field,
        "type": "BadRequest" if err.status == 400 else "Error", "code": err.status,
    })


async def _read(request: Request, model, limit: int):
    """The body, size-limited while streaming, parsed into `model` (an empty body means {})."""
    return _parse(model, await _read_body(request, limit))


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body if body.strip() else b"{}")
    except ValidationError as err:
        raise field_error(err) from None


def _declared_length(request: Request, limit: int) -> Optional[int]:
    """The Content-Length, if the client gave one; over `limit` is a 413 before any byte is read."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit:
        raise FieldError(None, f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
    return int(declared)


async def _read_body(request: Request, limit: int) -> bytes:
    _declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FieldError(None, f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)  # bytes: pydantic parses them faster than a bytearray


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_load_format(load_format: Optional[str]) -> None:
    if load_format != "safetensors":
        raise FieldError("load_format", "load_format must be 'safetensors' (safetensors blobs); this server never "
                                        f"unpickles, got {load_format!r}")


async def _binary_tensor_update(request: Request, state: "ServerState") -> dict:
    """`/update_weights_from_tensor` with the safetensors blob as the raw body
    (`Content-Type: application/octet-stream`) and SGLang's other fields in the query
    string: the same all-or-nothing update without base64 and JSON, for weight sync into
    this server. The header is checked as soon as it has arrived; the tensors then stream
    straight into the weights' spare storage and are swapped in once the body is complete,
    so the blob is never held whole and never copied again."""
    opts = _binary_update_options(request.query_params)
    size = _declared_length(request, state.max_weights_request_bytes)
    if size is None:
        raise FieldError("Content-Length", "a binary weight update needs a Content-Length header", 411)
    if not state.session_open:
        try:
            async for _ in request.stream():  # read and dropped, so the client sees the answer
                pass
        except ClientDisconnect:
            pass
        state.require_session("/update_weights_from_tensor")
    start = time.perf_counter()
    owner = object()  # this update's claims on spare storage
    decoder = tensor_codec.StreamDecoder(size, lambda specs: state.weights.landing_for(specs, owner))
    try:
        try:
            async for chunk in request.stream():
                decoder.feed(chunk)
            named = decoder.finish()
        except ClientDisconnect:
            raise FieldError("Content-Length", f"the client went away after {decoder.received} of {size} bytes; "
                                               "nothing was applied") from None
        except tensor_codec.CodecError as err:
            raise FieldError("body", f"body: {err}") from None
        read_s = time.perf_counter() - start
        count = await asyncio.to_thread(state.weights.install, named)
    finally:
        state.weights.release(decoder.tensors, owner)
    log.info("update_weights_from_tensor (binary): %d tensors, %.1f MB; read %.2fs, swap in %.2fs", count,
             size / 1e6, read_s, time.perf_counter() - start - read_s)
    return _updated(state, count, opts["weight_version"])


def _binary_update_options(query) -> dict:
    known = {"load_format", "flush_cache", "abort_all_requests", "weight_version"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise FieldError(unknown[0], f"unknown query parameter(s) {unknown}; valid: {sorted(known)}")
    opts = {"weight_version": query.get("weight_version"), "load_format": query.get("load_format", "safetensors")}
    _check_load_format(opts["load_format"])
    for key in ("flush_cache", "abort_all_requests"):
        value = query.get(key, "false" if key == "abort_all_requests" else "true").lower()
        if value not in ("true", "false"):
            raise FieldError(key, f"{key} must be true or false, got {value!r}")
        opts[key] = value == "true"
    return opts


def _per_item(value, count: int, name: str, default):
    """SGLang's convention: a scalar applies to every item, a list gives one value per item."""
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise FieldError(name, f"{name} has {len(value)} entries for {count} prompts")
        return [default if v is None else v for v in value]
    return [value] * count


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but the health checks (pure ASGI: a
    large weight update streams through untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = FieldError("Authorization", "missing or wrong 'Authorization: Bearer <api key>'", 401)
                await _error(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="autothink rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(FieldError)
    async def _field_error(_request: Request, err: FieldError):
        return _error(err)

    if state.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.api_key)

    @app.get("/health")
    async def health():
        return PlainTextResponse("", status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        if state.scheduler.paused or state.scheduler.busy:  # like SGLang: a server at work is not probed
            return PlainTextResponse("", status_code=200)
        fut = state.scheduler.submit([[0]], [SamplingParams(max_new_tokens=1, temperature=0.0)])
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), timeout=20)
        except Exception:
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse("", status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        model = state.generator.model
        return {
            "model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": state.weights.version,
            "dtype": dtype_name(next(model.parameters()).dtype), "device": str(state.weights.device),
            "vocab_size": state.vocab_size, "max_context_len": state.generator.context_len,
            "eos_token_ids": list(state.generator.eos_token_ids),
            "num_parameters": sum(p.numel() for p in model.parameters()), "server": "at_rollout",
            "tensor_update_bodies": ["json", "binary"],  # see _binary_tensor_update
        }

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {"server": "at_rollout", "model_path": state.model_path, "weight_update_session": True,
                "max_request_bytes": state.max_request_bytes,
                "max_weights_request_bytes": state.max_weights_request_bytes}

    @app.get("/get_weight_version")
    async def weight_version():
        return {"weight_version": state.weights.version}

    @app.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        await _read(request, WeightUpdateSessionRequest, state.max_request_bytes)
        if state.session_open:
            raise FieldError(None, "a weight-update session is already open; call /end_weight_update first")
        state.session_open = True
        return {"success": True, "message": "Success"}

    @app.post("/end_weight_update")
    async def end_weight_update(request: Request):
        await _read(request, EmptyRequest, state.max_request_bytes)
        if not state.session_open:
            raise FieldError(None, "no weight-update session is open; call /begin_weight_update first")
        state.session_open = False
        return {"success": True, "message": "Success"}

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        req = await _read(request, UpdateWeightVersionRequest, state.max_request_bytes)
        if req.abort_all_requests:
            state.scheduler.pause("abort")
            state.scheduler.resume()
        state.weights.version = req.new_version
        return {"success": True, "message": f"Weight version updated to {req.new_version}",
                "new_version": req.new_version}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        req = await _read(request, GenerateRequest, state.max_request_bytes)
        prompts, single = _prompts(req, state)
        count = len(prompts)
        raw = req.sampling_params
        if isinstance(raw, list) and len(raw) != count:
            raise FieldError("sampling_params", f"sampling_params has {len(raw)} entries for {count} prompts")
        params = [(raw[i] if isinstance(raw, list) else raw) for i in range(count)]
        params = [(p or SamplingParamsIn()).to_params(f"sampling_params[{i}]" if isinstance(raw, list)
                                                      else "sampling_params") for i, p in enumerate(params)]
        want_lp = _per_item(req.return_logprob, count, "return_logprob", False)
        for i, start in enumerate(_per_item(req.logprob_start_len, count, "logprob_start_len", -1)):
            if start != -1:
                raise FieldError("logprob_start_len", "only -1 (log-probs of output tokens) is supported, "
                                                      f"got {start}")
        for top in _per_item(req.top_logprobs_num, count, "top_logprobs_num", 0):
            if top:
                raise FieldError("top_logprobs_num", "top log-probs are not supported (only 0)")
        if req.stream:
            raise FieldError("stream", "streaming is not supported by this server")
        rids = _per_item(req.rid, count, "rid", None)
        samples = await asyncio.wrap_future(state.scheduler.submit(prompts, params))
        out, k = [], 0
        for i, p in enumerate(params):
            for j in range(p.n):
                rid = rids[i] if rids[i] is not None and p.n == 1 else (
                    f"{rids[i]}-{j}" if rids[i] is not None else uuid.uuid4().hex)
                out.append(sample_to_json(samples[k], rid, want_lp[i], state.generator.tokenizer,
                                          req.return_text_in_logprobs, state.weights.version))
                k += 1
        return FastJSON(out[0] if single and len(out) == 1 else out)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # No prefix cache to drop; like SGLang, refuse while requests run or wait.
        if state.scheduler.busy:
            return PlainTextResponse("Cache not flushed: requests are running or waiting.\n", status_code=400)
        return PlainTextResponse("Cache flushed.\n", status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        req = await _read(request, PauseRequest, state.max_request_bytes)
        state.scheduler.pause(req.mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        await _read(request, EmptyRequest, state.max_request_bytes)
        state.scheduler.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        if _content_type(request) == BINARY:
            return await _binary_tensor_update(request, state)
        start = time.perf_counter()
        body = await _read_body(request, state.max_weights_request_bytes)
        state.require_session("/update_weights_from_tensor")
        read_s = time.perf_counter() - start

        def work():  # off the event loop, which meanwhile reads the next bucket's body
            skeleton, lifted = lift_long_strings(body)
            req = _parse(UpdateWeightsFromTensorRequest, skeleton)
            _check_load_format(req.load_format)
            named, fields = {}, {}
            for i, blob in enumerate(req.serialized_named_tensors):
                where = f"serialized_named_tensors[{i}]"
                try:
                    decoded = tensor_codec.decode(lifted.get(blob, blob))
                except tensor_codec.CodecError as err:
                    raise FieldError(where, f"{where}: {err}") from None
                for name, t in decoded.items():
                    if name in named:
                        raise FieldError(where, f"weight {name!r} sent twice")
                    named[name], fields[name] = t, where
            decoded_s = time.perf_counter() - start
            count = state.weights.apply(named, fields)
            log.info("update_weights_from_tensor: %d tensors, %.1f MB; read %.2fs, decode %.2fs, apply %.2fs",
                     count, sum(t.numel() * t.element_size() for t in named.values()) / 1e6, read_s,
                     decoded_s - read_s, time.perf_counter() - start - decoded_s)
            return count, req.weight_version

        count, version = await asyncio.to_thread(work)
        return _updated(state, count, version)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        req = await _read(request, InitWeightsUpdateGroupRequest, state.max_request_bytes)
        try:
            await asyncio.to_thread(state.weights.init_group, req.master_address, req.master_port, req.rank_offset,
                                    req.world_size, req.group_name, req.backend)
        except FieldError:
            raise
        except Exception as err:
            raise FieldError(None, f"joining weight update group {req.group_name!r} at "
                                   f"{req.master_address}:{req.master_port} failed: {err}") from None
        return {"success": True, "message": f"joined weight update group {req.group_name!r}"}

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        req = await _read(request, UpdateWeightsFromDistributedRequest, state.max_request_bytes)
        state.require_session("/update_weights_from_distributed")  # before any broadcast is received
        if req.load_format not in (None, "direct"):
            raise FieldError("load_format", f"only per-tensor broadcasts are supported, got {req.load_format!r}")

        def work():
            start = time.perf_counter()
            owner = object()  # this update's claims on spare storage
            try:
                named = state.weights.receive(req.names, req.dtypes, req.shapes, req.group_name, owner)
            except FieldError:
                raise
            except Exception as err:
                raise FieldError(None, f"receiving weights over group {req.group_name!r} failed: {err}") from None
            received_s = time.perf_counter() - start
            try:
                count = state.weights.swap_in(named)
            finally:
                state.weights.release(named, owner)
            log.info("update_weights_from_distributed: %d tensors, %.1f MB; receive %.2fs, swap in %.2fs", count,
                     sum(t.numel() * t.element_size() for t in named.values()) / 1e6, received_s,
                     time.perf_counter() - start - received_s)
            return count

        count = await asyncio.to_thread(work)
        return _updated(state, count, req.weight_version)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        req = await _read(request, DestroyWeightsUpdateGroupRequest, state.max_request_bytes)
        await asyncio.to_thread(state.weights.destroy_group, req.group_name)
        return {"success": True, "message": f"destroyed weight update group {req.group_name!r}"}

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def memory_occupation(request: Request):
        await _read(request, MemoryOccupationRequest, state.max_request_bytes)
        return {"success": True, "message": "accepted (no-op: this server does not release memory)"}

    return app


def _prompts(req: GenerateRequest, state: ServerState):
    """Token ids per prompt and whether the request was a single prompt (not a batch)."""
    if (req.text is None) == (req.input_ids is None):
        raise FieldError("input_ids", "give exactly one of 'text' and 'input_ids'")
    if req.text is not None:
        if state.generator.tokenizer is None:
            raise FieldError("text", "this server has no tokenizer; send input_ids")
        texts = [req.text] if isinstance(req.text, str) else req.text
        prompts = [state.generator.tokenizer.encode(t) for t in texts]
        single, name = isinstance(req.text, str), "text"
    else:
        ids = req.input_ids
        single = not ids or not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        name = "input_ids"
    if not prompts:
        raise FieldError(name, f"{name} is an empty batch")
    limit = state.generator.context_len
    for i, p in enumerate(prompts):
        where = name if single else f"{name}[{i}]"
        if not p:
            raise FieldError(where, f"{where} is empty")
        if len(p) >= limit:
            raise FieldError(where, f"{where} has {len(p)} tokens; the model's context is {limit}")
        bad = next((t for t in p if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise FieldError(where, f"{where}: token id {bad} is outside the vocabulary (size {state.vocab_size})")
    return prompts, single


def _updated(state: ServerState, count: int, version: Optional[str]) -> dict:
    if version is not None:
        state.weights.version = version
    return {"success": True, "message": f"updated {count} weights"}
