"""One HTTP client for our rollout server and for real SGLang (same endpoints, same fields).

Connection errors and 5xx answers are retried with exponential backoff; after the last
try the error names the URL. A 4xx is the caller's mistake and is raised at once with the
server's message (naming the field), except `/flush_cache`'s 400, which SGLang answers
while requests are still running: that one is retried until `flush_timeout_s`.

The fields sent and read are the ones declared in `protocol.py` (`SGLANG_REQUESTS`,
`*_READ`), which the contract tests check against every supported SGLang release.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import requests
import torch

from . import tensor_codec
from .protocol import SERVER_INFO_READ, SESSION_SINCE, Sample, generate_body, parse_sample, sent_fields, version_tuple
from .tensor_codec import dtype_name

__all__ = ["RolloutClient", "RolloutError", "Sample"]


class RolloutError(RuntimeError):
    """The rollout server could not be reached or refused a request."""

    def __init__(self, message: str, status: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.field = field

    @property
    def refused(self) -> bool:
        """A 4xx: the request itself is wrong and will never succeed (no retry, no restart)."""
        return self.status is not None and 400 <= self.status < 500


class RolloutClient:
    def __init__(self, url: str, api_key: Optional[str] = None, timeout_s: float = 600.0, retries: int = 3,
                 backoff_s: float = 0.5, connect_timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._local = threading.local()  # one requests.Session per thread (sessions are not thread-safe)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session_needed: Optional[bool] = None

    # ---------------------------------------------------------------- transport
    @property
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def request(self, method: str, path: str, body: Any = None, *, data: Any = None,
                timeout_s: Optional[float] = None, retries: Optional[int] = None,
                content_type: str = "application/json", params: Optional[Mapping] = None) -> requests.Response:
        """One call with retries on connection errors and 5xx; raises RolloutError on 4xx or when out of tries."""
        url = f"{self.url}{path}"
        headers = dict(self._headers)
        if body is not None or data is not None:
            headers["Content-Type"] = content_type
            if data is None:
                data = json.dumps(body).encode()
        tries = (self.retries if retries is None else retries) + 1
        last: Optional[str] = None
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._session.request(method, url, data=data, headers=headers, params=params,
                                             timeout=(self.connect_timeout_s, timeout_s or self.timeout_s))
            except (requests.ConnectionError, requests.exceptions.ConnectTimeout) as err:
                last = f"cannot connect ({type(err).__name__}: {err})"
                continue
            except requests.exceptions.ChunkedEncodingError as err:  # the server died while answering
                last = f"connection broken mid-response ({err})"
                continue
            except requests.Timeout:
                raise RolloutError(f"{method} {url}: no answer within {timeout_s or self.timeout_s:.0f}s") from None
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:500]}"
                continue
            if resp.status_code >= 400:
                raise _refused(method, url, resp)
            return resp
        raise RolloutError(f"{method} {url} failed after {tries} tries: {last}")

    def _post(self, path: str, body: Any = None, **kw) -> Any:
        resp = self.request("POST", path, {} if body is None else body, **kw)
        return resp.json() if resp.content and resp.headers.get("content-type", "").startswith("application/json") \
            else None

    # ---------------------------------------------------------------- health and info
    def health(self, timeout_s: float = 30.0) -> bool:
        """Whether /health_generate answers 200: SGLang generates one token for it (its plain
        /health answers 200 before the engine can serve), so this is readiness."""
        try:
            return self._session.get(f"{self.url}/health_generate", headers=self._headers,
                                     timeout=(self.connect_timeout_s, timeout_s)).status_code == 200
        except requests.RequestException:
            return False

    def wait_for_health(self, timeout_s: float = 300.0, interval_s: float = 0.5, process=None) -> None:
        """Poll /health_generate until it answers 200; `process` (a Popen) dying ends the wait early."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RolloutError(f"{self.url}: server process exited with code {process.returncode} before it "
                                   "became healthy")
            if self.health(max(1.0, min(30.0, deadline - time.monotonic()))):
                return
            time.sleep(interval_s)
        raise RolloutError(f"{self.url}/health_generate did not answer 200 within {timeout_s:.0f}s")

    def model_info(self) -> dict:
        return self._get_info("/model_info", "/get_model_info")

    def server_info(self) -> dict:
        return self._get_info("/server_info", "/get_server_info")

    def _get_info(self, path: str, old_path: str) -> dict:
        """GET `path`, or SGLang's older name for it where the server answers 404."""
        try:
            return self.request("GET", path).json()
        except RolloutError as err:
            if err.status != 404:
                raise
            return self.request("GET", old_path).json()

    def needs_weight_update_session(self) -> bool:
        """Whether updates must run between /begin_weight_update and /end_weight_update
        (SGLang >= 0.5.21 refuses them otherwise, without receiving the tensors; our server
        too). Asked once per client: our server says so; SGLang by its version, or, for a
        source build without one, by whether it has the route."""
        if self._session_needed is None:
            info = self.server_info()
            if "weight_update_session" in info:
                self._session_needed = bool(info["weight_update_session"])
            else:
                version = version_tuple(info.get(SERVER_INFO_READ[0]))
                self._session_needed = version >= version_tuple(SESSION_SINCE) if version else self._has_session_route()
        return self._session_needed

    def _has_session_route(self) -> bool:
        # Without an open session SGLang answers 400 ("no weight-update session is open");
        # a release without the route answers 404. Either way nothing changes on the server.
        try:
            self.request("POST", "/end_weight_update", {}, retries=0)
        except RolloutError as err:
            return err.status != 404
        return True

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: Mapping | Sequence[Mapping],
                 return_logprob: bool = False, timeout_s: Optional[float] = None) -> list[Sample]:
        """A batch of prompts in one request; `n` samples per prompt come back prompt-major.
        Per-token log-probs only with `return_logprob` (the trainer recomputes its own)."""
        body, ns = generate_body(input_ids, sampling_params, return_logprob)
        if not body["input_ids"]:
            return []
        out = self.request("POST", "/generate", body, timeout_s=timeout_s).json()
        out = out if isinstance(out, list) else [out]
        if len(out) != sum(ns):
            raise RolloutError(f"POST {self.url}/generate: expected {sum(ns)} samples, got {len(out)}")
        prompt_of = [i for i, n in enumerate(ns) for _ in range(n)]
        return [parse_sample(o, prompt_of[k], return_logprob) for k, o in enumerate(out)]

    # ---------------------------------------------------------------- control
    def flush_cache(self, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.request("POST", "/flush_cache")
                return
            except RolloutError as err:
                if err.status != 400 or time.monotonic() > deadline:
                    raise
            time.sleep(interval_s)

    def pause_generation(self, mode: Optional[str] = None) -> None:
        self._call("/pause_generation", {} if mode is None else {"mode": mode})

    def continue_generation(self) -> None:
        self._call("/continue_generation", {})

    def release_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        self._call("/release_memory_occupation", {} if tags is None else {"tags": tags})

    def resume_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        self._call("/resume_memory_occupation", {} if tags is None else {"tags": tags})

    def _call(self, route: str, body: dict, **kw) -> Any:
        sent_fields(route, body)
        return self._post(route, body, **kw)

    # ---------------------------------------------------------------- weights
    def update_weights_from_tensor(self, named_tensors: Mapping[str, torch.Tensor] | Iterable, flush_cache: bool = True,
                                   weight_version: Optional[str] = None, timeout_s: Optional[float] = None) -> dict:
        """Send tensors as one base64 safetensors blob (`load_format: safetensors`); applied all or nothing."""
        named = dict(named_tensors)
        return self.update_weights_from_serialized([tensor_codec.encode(named, as_bytes=True)], flush_cache, weight_version,
                                                   timeout_s)

    def update_weights_from_serialized(self, blobs: Sequence[str], flush_cache: bool = True,
                                       weight_version: Optional[str] = None,
                                       timeout_s: Optional[float] = None) -> dict:
        # The body is assembled from bytes: base64 needs no JSON escaping, and json.dumps over a
        # multi-GB string would cost another full copy.
        tail = {"load_format": "safetensors", "flush_cache": flush_cache}
        if weight_version is not None:
            tail["weight_version"] = weight_version
        sent_fields("/update_weights_from_tensor", ["serialized_named_tensors", *tail])
        parts = [b'{"serialized_named_tensors":[']
        for i, blob in enumerate(blobs):
            parts += [b',"' if i else b'"', blob.encode("ascii") if isinstance(blob, str) else blob, b'"']
        parts.append(b"]," + json.dumps(tail).encode()[1:])
        return self.request("POST", "/update_weights_from_tensor", data=_Parts(parts), timeout_s=timeout_s).json()

    def update_weights_from_blob(self, blob, flush_cache: bool = True, weight_version: Optional[str] = None,
                                 timeout_s: Optional[float] = None) -> dict:
        """Send one safetensors blob (bytes-like, or its parts in order: `tensor_codec.blob_parts`)
        as the raw request body. Our server only (it lists "binary" in /model_info's
        `tensor_update_bodies`): no base64, no JSON, decoded straight into the weights."""
        params = {"load_format": "safetensors", "flush_cache": "true" if flush_cache else "false"}
        if weight_version is not None:
            params["weight_version"] = weight_version
        sent_fields("/update_weights_from_tensor", ["serialized_named_tensors", *params])
        parts = blob if isinstance(blob, (list, tuple)) else [blob]
        return self.request("POST", "/update_weights_from_tensor", data=_Parts(parts), timeout_s=timeout_s,
                            content_type="application/octet-stream", params=params).json()

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  timeout_s: Optional[float] = None) -> dict:
        return self._call("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}, timeout_s=timeout_s,
            retries=0)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: Optional[str] = None,
                                        timeout_s: Optional[float] = None) -> dict:
        """Announce one bucket; the caller then broadcasts each tensor from rank 0, in this order."""
        body = {"names": list(names), "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                "dtypes": [d if isinstance(d, str) else dtype_name(d) for d in dtypes], "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        # Never retried: a repeated announcement would wait for broadcasts that will not come.
        return self._call("/update_weights_from_distributed", body, timeout_s=timeout_s, retries=0)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group",
                                     retries: Optional[int] = None) -> dict:
        return self._call("/destroy_weights_update_group", {"group_name": group_name}, retries=retries)

    def begin_weight_update(self) -> dict:
        """Open the weight-update session (SGLang >= 0.5.21, our server); never retried."""
        return self._call("/begin_weight_update", {}, retries=0)

    def end_weight_update(self) -> dict:
        return self._call("/end_weight_update", {}, retries=0)

    def update_weight_version(self, version: str) -> dict:
        """Name the served weights (each generation's meta_info says it back)."""
        return self._call("/update_weight_version", {"new_version": str(version)})

    @contextlib.contextmanager
    def weight_update_session(self):
        """`with client.weight_update_session(): ...updates...`, where the server has one."""
        needed = self.needs_weight_update_session()
        if needed:
            self.begin_weight_update()
        try:
            yield
        finally:
            if needed:
                self.end_weight_update()


class _Parts:
    """A body sent part by part with a known Content-Length (no joined copy of a big blob);
    iterable again for a retry."""

    def __init__(self, parts):
        self.parts = [memoryview(p) for p in parts]

    def __len__(self):
        return sum(p.nbytes for p in self.parts)

    def __iter__(self):
        chunk = 1 << 20
        for p in self.parts:
            for i in range(0, p.nbytes, chunk):
                yield p[i:i + chunk]


def _refused(method: str, url: str, resp: requests.Response) -> RolloutError:
    """The server's own message: ours `{"message", "field"}`, SGLang's weight endpoints
    `{"success": false, "message"}`, its others `{"error": {"message"}}` or FastAPI's `{"detail"}`."""
    field_name, message = None, resp.text[:1000]
    try:
        payload = resp.json()
        if isinstance(payload, dict):
            err = payload.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            message = payload.get("message") or err or payload.get("detail") or message
            field_name = payload.get("field")
    except ValueError:
        pass
    return RolloutError(f"{method} {url}: HTTP {resp.status_code}: {message}", resp.status_code, field_name)
