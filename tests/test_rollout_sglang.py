"""The SGLang side without SGLang: launch command lines from the rollout config, and the
request bodies our client sends, checked against SGLang 0.5.x's request dataclasses
(`python/sglang/srt/managers/io_struct.py`, `sampling/sampling_params.py`)."""
from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from at_core.config import load_config
from at_rollout.client import RolloutClient, RolloutError
from at_rollout.sglang import SGLangServer, check_rollout_config, sglang_command
from at_rollout.weight_sync import WeightSync

# Field names of SGLang 0.5.x's request dataclasses (the subset a client may send).
SGLANG_FIELDS = {
    "/generate": {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                  "return_text_in_logprobs", "stream", "rid", "log_metrics"},
    "/init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size", "group_name",
                                   "backend"},
    "/update_weights_from_distributed": {"names", "dtypes", "shapes", "group_name", "flush_cache",
                                         "abort_all_requests", "weight_version", "load_format"},
    "/update_weights_from_tensor": {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
                                    "weight_version"},
    "/destroy_weights_update_group": {"group_name"},
    "/pause_generation": {"mode"},
    "/continue_generation": set(),
    "/release_memory_occupation": {"tags"},
    "/resume_memory_occupation": {"tags"},
    "/flush_cache": set(),
}
SGLANG_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids",
                   "ignore_eos", "skip_special_tokens", "sampling_seed", "no_stop_trim"}


def rollout_cfg(*overrides):
    return load_config(overrides=["rollout.backend=sglang", "rollout.sync_method=distributed", *overrides]).rollout


def test_command_line_from_the_rollout_config():
    cfg = rollout_cfg("rollout.tp_size=4", "rollout.mem_fraction=0.55", "rollout.colocate=true",
                      "rollout.api_key=secret", "rollout.host=10.0.0.5")
    cmd = sglang_command(cfg, "/models/r1", 30123, seed=7, python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--model-path"] == "/models/r1" and flags["--tp-size"] == "4"
    assert flags["--mem-fraction-static"] == "0.55" and flags["--port"] == "30123"
    assert flags["--random-seed"] == "7" and flags["--dtype"] == "bfloat16"
    assert flags["--host"] == "10.0.0.5" and flags["--api-key"] == "secret"
    assert "--enable-memory-saver" in cmd and "--skip-server-warmup" in cmd
    plain = sglang_command(rollout_cfg(), "/m", 1)
    assert "--enable-memory-saver" not in plain and "--api-key" not in plain and "--dp-size" not in plain
    assert "--dp-size" in sglang_command(rollout_cfg(), "/m", 1, dp_size=2)


def test_config_sglang_cannot_serve_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="rollout.sync_method"):
        check_rollout_config(load_config(overrides=["rollout.backend=sglang"]).rollout)
    with pytest.raises(ValueError, match="rollout.api_key"):
        check_rollout_config(rollout_cfg("rollout.host=0.0.0.0"))
    with pytest.raises(ValueError, match="rollout.mem_fraction"):
        check_rollout_config(rollout_cfg("rollout.mem_fraction=1.5"))


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
def test_failed_sglang_start_raises_with_the_log_tail(tmp_path):
    server = SGLangServer(rollout_cfg("rollout.startup_timeout_s=60"), "/models/none", log_file=tmp_path / "s.log")
    with pytest.raises(RolloutError, match="No module named"):
        server.start()
    assert not server.alive()
    ws = server.weight_sync()
    assert ws.method == "distributed" and ws.backend == "nccl" and ws.engine_ranks == 1


class _StandIn(BaseHTTPRequestHandler):
    """Records each request (path, JSON body) and answers as SGLang does."""

    log: list = []

    def _answer(self):
        size = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(size) or b"{}")
        self.log.append((self.path, body, self.headers.get("authorization")))
        if self.path == "/generate":
            n = body["sampling_params"].get("n", 1)
            out = [{"text": "x", "output_ids": [5, 6], "meta_info": {
                "id": "r", "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": len(p),
                "completion_tokens": 2, "output_token_logprobs": [[-0.5, 5, None], [-0.25, 6, None]]}}
                for p in body["input_ids"] for _ in range(n)]
        else:
            out = {"success": True, "message": "ok"}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    _StandIn.log = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _StandIn.log
    httpd.shutdown()


def test_client_request_bodies_use_sglang_fields(stand_in):
    url, log = stand_in
    c = RolloutClient(url, api_key="k")
    out = c.generate([[1, 2], [3]], {"max_new_tokens": 4, "temperature": 0.6, "top_p": 0.95, "n": 2,
                                     "stop": ["</answer>"], "sampling_seed": 1})
    assert [o.prompt_index for o in out] == [0, 0, 1, 1]
    assert out[0].logprobs == [-0.5, -0.25] and out[0].finish_reason == "stop" and out[0].matched == 6
    c.init_weights_update_group("10.0.0.1", 29500, 1, 3, backend="nccl")
    c.update_weights_from_distributed(["lm_head.weight"], [torch.bfloat16], [[8, 4]], weight_version="3")
    c.update_weights_from_tensor({"a": torch.zeros(2)})
    c.destroy_weights_update_group()
    c.pause_generation("abort")
    c.flush_cache()
    c.continue_generation()
    c.release_memory_occupation(["kv_cache"])
    c.resume_memory_occupation()
    for path, body, auth in log:
        assert auth == "Bearer k"
        assert set(body) <= SGLANG_FIELDS[path], (path, set(body) - SGLANG_FIELDS[path])
        if path == "/generate":
            assert set(body["sampling_params"]) <= SGLANG_SAMPLING
    bodies = {path: body for path, body, _ in log}
    assert bodies["/update_weights_from_distributed"]["dtypes"] == ["bfloat16"]
    assert bodies["/update_weights_from_distributed"]["shapes"] == [[8, 4]]
    assert bodies["/init_weights_update_group"] == {"master_address": "10.0.0.1", "master_port": 29500,
                                                    "rank_offset": 1, "world_size": 3,
                                                    "group_name": "weight_update_group", "backend": "nccl"}


def test_sync_protocol_order_pause_flush_buckets_continue(stand_in):
    url, log = stand_in
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    stats = WeightSync(RolloutClient(url), "tensor", bucket_mb=0.02).sync(model)
    paths = [p for p, _, _ in log]
    assert paths[:3] == ["/model_info", "/pause_generation", "/flush_cache"]  # the served dtype, asked once
    assert paths[-1] == "/continue_generation"
    assert paths[3:-1] == ["/update_weights_from_tensor"] * stats.buckets and stats.buckets == 2
    assert stats.tensors == 4
