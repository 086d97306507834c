"""The SGLang side without SGLang: launch command lines from the rollout config, and the
calls our client makes, in order, against a stand-in that answers as SGLang's routes do in
a release without the weight-update session (0.5.15.post1) and one with it (0.5.23). The
fields themselves are checked against SGLang's own source in test_sglang_contract.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from at_core.config import load_config
from at_rollout.backends import BACKENDS, get_backend
from at_rollout.client import RolloutClient, RolloutError
from at_rollout.transports.nccl import DistributedTransport
from at_rollout.protocol import SAMPLING_FIELDS, SESSION_ROUTES, SGLANG_BODYLESS, SGLANG_REQUESTS
from at_rollout.backends.sglang import SGLangServer, check_rollout_config, sglang_command
from at_rollout.weight_sync import WeightSync

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
    t = get_backend("sglang").transport(rollout_cfg(), engines=1)  # what RolloutWorkers builds for it
    assert isinstance(t, DistributedTransport) and t.backend == "nccl" and t.engine_ranks == 1


class _StandIn(BaseHTTPRequestHandler):
    """Records each request (path, JSON body) and answers as SGLang `version` does: the
    session routes exist from 0.5.21 on, and there an update outside a session is a 400."""

    log: list = []
    version = "0.5.23"
    has_session = True  # the routes exist (a source build says version 0.0.0.dev0 either way)
    session = False
    refuse_updates = False

    def _answer(self):
        size = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(size) or b"{}")
        path = self.path.split("?")[0]
        self.log.append((path, body, self.headers.get("authorization")))
        has_session = _StandIn.has_session
        status, out = 200, {"success": True, "message": "ok"}
        if path == "/generate":
            n = body["sampling_params"].get("n", 1)
            out = [{"text": "x", "output_ids": [5, 6], "meta_info": {
                "id": "r", "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": len(p),
                "completion_tokens": 2, "output_token_logprobs": [[-0.5, 5, None], [-0.25, 6, None]],
                "weight_version": "7"}} for p in body["input_ids"] for _ in range(n)]
        elif path == "/server_info":
            out = {"version": self.version, "tp_size": 1}
        elif path == "/model_info":
            out = {"model_path": "/m", "weight_version": "default", "is_generation": True}
        elif path in SESSION_ROUTES and not has_session:
            status, out = 404, {"detail": "Not Found"}
        elif path in SESSION_ROUTES:
            opening = path == "/begin_weight_update"
            if opening == _StandIn.session:
                status, out = 400, {"success": False, "message": "session already open" if opening else
                                    "no weight-update session is open; call begin_weight_update() first"}
            _StandIn.session = opening if status == 200 else _StandIn.session
        elif path.startswith("/update_weights_from") and _StandIn.refuse_updates:
            status, out = 400, {"success": False, "message": "Failed to update parameter online: bad shape"}
        elif path.startswith("/update_weights_from") and has_session and not _StandIn.session:
            status, out = 400, {"success": False, "message": f"{path[1:]} must run between "
                                "begin_weight_update() and end_weight_update()"}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(params=[("0.5.15.post1", False), ("0.5.23", True), ("0.0.0.dev0", True)])
def stand_in(request):
    _StandIn.log, _StandIn.session, _StandIn.refuse_updates = [], False, False
    _StandIn.version, _StandIn.has_session = request.param
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _StandIn.log
    httpd.shutdown()


def test_client_sends_only_the_declared_fields(stand_in):
    url, log = stand_in
    c = RolloutClient(url, api_key="k")
    out = c.generate([[1, 2], [3]], {"max_new_tokens": 4, "temperature": 0.6, "top_p": 0.95, "n": 2,
                                     "stop": ["</answer>"], "sampling_seed": 1}, return_logprob=True)
    assert [o.prompt_index for o in out] == [0, 0, 1, 1] and out[0].weight_version == "7"
    assert out[0].logprobs == [-0.5, -0.25] and out[0].finish_reason == "stop" and out[0].matched == 6
    # The trainer's path asks for no per-token log-probs (it recomputes its own): not sent, not read.
    plain = c.generate([[1, 2]], {"max_new_tokens": 4})
    assert log[-1][0] == "/generate" and log[-1][1]["return_logprob"] is False and plain[0].logprobs is None
    c.init_weights_update_group("10.0.0.1", 29500, 1, 3, backend="nccl")
    with c.weight_update_session():
        c.update_weights_from_distributed(["lm_head.weight"], [torch.bfloat16], [[8, 4]], weight_version="3")
        c.update_weights_from_tensor({"a": torch.zeros(2)})
    c.update_weight_version("4")
    c.destroy_weights_update_group()
    c.pause_generation("abort")
    c.flush_cache()
    c.continue_generation()
    c.release_memory_occupation(["kv_cache"])
    c.resume_memory_occupation()
    for path, body, auth in log:
        assert auth == "Bearer k"
        if path in SGLANG_BODYLESS:
            assert body == {}
            continue
        assert set(body) <= set(SGLANG_REQUESTS[path][1]), (path, set(body) - set(SGLANG_REQUESTS[path][1]))
        if path == "/generate":
            assert set(body["sampling_params"]) <= set(SAMPLING_FIELDS)
    bodies = {path: body for path, body, _ in log}
    assert bodies["/update_weights_from_distributed"]["dtypes"] == ["bfloat16"]
    assert bodies["/update_weights_from_distributed"]["shapes"] == [[8, 4]]
    assert bodies["/init_weights_update_group"] == {"master_address": "10.0.0.1", "master_port": 29500,
                                                    "rank_offset": 1, "world_size": 3,
                                                    "group_name": "weight_update_group", "backend": "nccl"}
    assert bodies["/update_weight_version"] == {"new_version": "4"}


def test_sync_order_with_and_without_the_session(stand_in):
    url, log = stand_in
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    sync = WeightSync(RolloutClient(url), "tensor", bucket_mb=0.02)
    stats = sync.sync(model, weight_version=12)
    paths = [p for p, _, _ in log]
    session = _StandIn.has_session
    probe = ["/server_info"]  # the version says whether the session exists: asked once ...
    if _StandIn.version.startswith("0.0.0"):
        probe.append("/end_weight_update")  # ... else the route is probed (400: it exists, no session open)
    # the first sync closes any session a dead trainer left open (the stand-in answers 400: none)
    head = probe + ["/model_info", "/pause_generation", "/flush_cache"] + \
        ["/end_weight_update", "/begin_weight_update"] * session
    tail = ["/end_weight_update"] * session + ["/update_weight_version", "/continue_generation"]
    assert paths == head + ["/update_weights_from_tensor"] * stats.buckets + tail and stats.buckets == 2
    assert log[-2][1] == {"new_version": "12"} and stats.tensors == 4
    log.clear()
    sync.sync(model)
    assert [p for p, _, _ in log][:3] == ["/pause_generation", "/flush_cache"] + \
        ["/begin_weight_update"] * session + ["/update_weights_from_tensor"] * (not session)  # nothing asked again
    assert not _StandIn.session


def test_a_failed_sync_closes_the_session_and_raises_the_servers_message(stand_in):
    url, log = stand_in
    c = RolloutClient(url, retries=0)
    session = _StandIn.has_session
    if session:
        with pytest.raises(RolloutError, match="must run between") as err:
            c.update_weights_from_distributed(["w"], ["float32"], [[1]])  # outside a session: refused
        assert err.value.status == 400 and err.value.refused
        _StandIn.session = True  # a session left open by a trainer that died: closed by the first sync
    sync = WeightSync(c, "tensor", bucket_mb=0.02)
    sync.sync(torch.nn.Linear(4, 4))
    _StandIn.refuse_updates = True
    log.clear()
    with pytest.raises(RolloutError, match="bad shape") as err:
        sync.sync(torch.nn.Linear(4, 4))
    assert err.value.status == 400 and err.value.refused  # a 4xx: never retried by the caller
    assert not _StandIn.session and [p for p, _, _ in log].count("/end_weight_update") == session
    assert "/continue_generation" not in [p for p, _, _ in log]  # left paused, as documented


def test_data_parallel_engines_cannot_take_distributed_updates():
    with pytest.raises(ValueError, match="dp_size=2"):
        get_backend("sglang").transport(rollout_cfg(), engines=1, dp_size=2)


def test_one_registry_chooses_the_backend():
    from at_core.config import ConfigError, validate

    assert {"server", "sglang"} <= set(BACKENDS) and get_backend("sglang").continuous_batching
    with pytest.raises(ValueError, match="rollout.backend"):
        get_backend("vllm")
    cfg = load_config()
    cfg.rollout.backend = "vllm"
    with pytest.raises(ConfigError, match="rollout.backend"):
        validate(cfg)


def test_the_client_side_imports_neither_the_server_nor_pydantic():
    code = ("import sys, at_rollout.protocol; assert 'torch' not in sys.modules and 'pydantic' not in sys.modules; "
            "import at_core.rollout; bad = sorted(m for m in sys.modules if m.startswith('at_rollout.server') "
            "or m == 'pydantic'); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
