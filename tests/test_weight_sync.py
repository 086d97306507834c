"""Weight sync into a real server process from a single-process trainer: both methods,
all-or-nothing rejection of bad updates, and recovery after the server dies."""
from __future__ import annotations

import base64
import copy
import time

import pytest
import requests
import torch

from at_rollout.client import RolloutError
from at_rollout.server.generator import logprob_temperature
from at_rollout.backends.own_server import LocalServer
from at_rollout import tensor_codec
from at_rollout.weight_sync import WeightSync

SP = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "n": 2, "sampling_seed": 3}
PROMPTS = [[0, 3, 40, 41, 42, 9], [0, 3, 50, 51]]


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout_s=60, retries=2, backoff_s=0.1)


class Policy(torch.nn.Module):
    """A trainer-side wrapper around the HF model (names gain a prefix the server does not know)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def max_diff(client, model) -> float:
    """Served log-probs of served samples against the local model's recomputation."""
    worst = 0.0
    for s in client.generate(PROMPTS, SP, return_logprob=True):
        p = PROMPTS[s.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([p + s.output_ids])).logits[0, len(p) - 1:-1].float()
        lp = torch.log_softmax(logits / logprob_temperature(SP["temperature"]), -1)
        ref = lp.gather(1, torch.tensor(s.output_ids)[:, None]).squeeze(1)
        worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    return worst


def served(client):
    return [(s.output_ids, s.logprobs) for s in client.generate(PROMPTS, SP, return_logprob=True)]


@pytest.mark.parametrize("method", ["tensor", "tensor-json", "distributed"])
def test_sync_makes_served_logprobs_match(client, model, method):
    perturb(model, 1)
    assert max_diff(client, model) > 1e-3
    method, _, body = method.partition("-")
    sync = WeightSync(client, method, bucket_mb=0.05, timeout_s=20, tensor_body=body or "auto")
    try:
        stats = sync.sync(Policy(model), weight_version=f"v-{method}")
        assert stats.tensors == len(list(model.parameters())) and stats.buckets >= 5
        assert max_diff(client, model) < 1e-5
        assert client.model_info()["weight_version"] == f"v-{method}"
        # A second sync over the same group works too.
        perturb(model, 2)
        sync.sync(model)
        assert max_diff(client, model) < 1e-5
    finally:
        sync.close()


def test_rejected_tensor_updates_leave_weights_untouched(server, client, model):
    before = served(client)
    sd = model.state_dict()
    good = {k: v + 1.0 for k, v in list(sd.items())[:3]}
    bad_cases = [
        ({**good, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, "model.layers.0.mlp.up_proj.weight"),
        ({**good, "model.layers.99.nope.weight": torch.zeros(2)}, "model.layers.99.nope.weight"),
        ({**good, "lm_head.weight": sd["lm_head.weight"].to(torch.float16)}, "float16"),
    ]
    with client.weight_update_session():
        for named, name in bad_cases:
            with pytest.raises(RolloutError) as err:
                client.update_weights_from_tensor(named)
            assert err.value.status == 400 and err.value.field == "serialized_named_tensors[0]", err.value
            assert name in str(err.value)
        blob = tensor_codec.encode(good)
        for body, field in [
            ({"serialized_named_tensors": [blob]}, "load_format"),
            ({"serialized_named_tensors": ["%%%"], "load_format": "safetensors"}, "serialized_named_tensors[0]"),
            ({"serialized_named_tensors": [base64.b64encode(b"junk").decode()], "load_format": "safetensors"},
             "serialized_named_tensors[0]"),
            ({"serialized_named_tensors": blob, "load_format": "safetensors"}, "serialized_named_tensors"),
        ]:
            r = requests.post(server.url + "/update_weights_from_tensor", json=body, timeout=30)
            assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert served(client) == before  # bit-identical: nothing was applied


def test_rejected_binary_updates_leave_weights_untouched(server, client, model):
    """The raw-body form: same all-or-nothing checks, errors naming the body or query key."""
    assert "binary" in client.model_info()["tensor_update_bodies"]
    before = served(client)
    sd = model.state_dict()
    good = {k: v + 1.0 for k, v in list(sd.items())[:3]}
    url = server.url + "/update_weights_from_tensor"
    octet = {"Content-Type": "application/octet-stream"}
    with client.weight_update_session():
        for named, name in [({**good, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, "up_proj"),
                            ({**good, "model.layers.99.nope.weight": torch.zeros(2)}, "nope"),
                            ({**good, "lm_head.weight": sd["lm_head.weight"].to(torch.float16)}, "float16")]:
            with pytest.raises(RolloutError) as err:
                client.update_weights_from_blob(tensor_codec.serialize(named))
            assert err.value.status == 400 and err.value.field == "body" and name in str(err.value)
        blob = bytes(tensor_codec.serialize(good))
        for data, params, status, field in [
            (blob[:-4], {}, 400, "body"),  # truncated data region
            (b"\xff" * 16, {}, 400, "body"),  # header length past the end
            (blob, {"load_format": "pickle"}, 400, "load_format"),
            (blob, {"flush_cache": "maybe"}, 400, "flush_cache"),
            (blob, {"weights_version": "x"}, 400, "weights_version"),
            (iter([blob]), {}, 411, "Content-Length"),  # chunked: no declared length
        ]:
            r = requests.post(url, data=data, params=params, headers=octet, timeout=30)
            assert r.status_code == status and r.json()["field"] == field, r.text
        assert served(client) == before  # bit-identical: nothing was applied
        client.update_weights_from_blob(tensor_codec.serialize(dict(sd)), weight_version="binary-ok")
    assert client.model_info()["weight_version"] == "binary-ok"


def test_concurrent_binary_updates_of_the_same_weights_never_mix(client, model):
    """Two updates of the same weights in flight at once: each lands in storage of its own
    (one in the spare, the other in a fresh buffer), so the served tensors are one update
    or the other, whole, never a mixture."""
    import threading

    sd = model.state_dict()
    names = [k for k in sd if k.startswith("model.layers.0.")]
    updates = [{k: torch.full_like(sd[k], float(v)) for k in names} for v in (1, 2)]
    blobs = [bytes(tensor_codec.serialize(u)) for u in updates]
    with client.weight_update_session():
        for _ in range(3):
            threads = [threading.Thread(target=client.update_weights_from_blob, args=(b,)) for b in blobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            # Whichever was swapped in last is served, whole (both carry the same weights).
            assert min(max_diff(client, _with(model, u)) for u in updates) < 1e-5
        client.update_weights_from_blob(tensor_codec.serialize(dict(sd)))  # leave the served model as it was


def test_spare_storage_claims_belong_to_their_update(model):
    """An update landing in a weight's spare owns it until it releases it: a concurrent update
    gets storage of its own, and that one's release does not free the first one's claim."""
    import threading

    from at_rollout.tensor_codec import TensorSpec
    from at_rollout.server.weights import ServedWeights

    weights = ServedWeights(model, threading.Lock())
    name = "model.norm.weight"
    t = weights.tensors[name]
    spec = [TensorSpec(name, t.dtype, list(t.shape), 0, t.numel() * t.element_size())]
    a, b, c = object(), object(), object()
    (spare,) = weights.landing_for(spec, a)
    (other,) = weights.landing_for(spec, b)
    assert other.data_ptr() not in (spare.data_ptr(), t.data_ptr())
    weights.release([name], b)  # b's release leaves a's claim alone
    (third,) = weights.landing_for(spec, c)
    assert third.data_ptr() != spare.data_ptr()
    weights.release([name], a)
    weights.release([name], c)
    (again,) = weights.landing_for(spec, c)
    assert again.data_ptr() == spare.data_ptr()  # free again: the spare is reused


def _with(model, update):
    m = copy.deepcopy(model)
    m.load_state_dict(update, strict=False)
    return m


def test_binary_body_shorter_than_declared_is_a_400_and_the_server_keeps_serving(server, client):
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server.url)
    client.begin_weight_update()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/update_weights_from_tensor")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", "1000")
    conn.endheaders()
    conn.send(b"x" * 10)
    conn.sock.shutdown(1)  # the client stops sending: the body ends early
    try:
        resp = conn.getresponse()
        assert resp.status == 400 and b"Content-Length" in resp.read()
    except (ConnectionError, http.client.RemoteDisconnected):
        pass  # the server may also just drop a connection whose body never came
    finally:
        conn.close()
        client.end_weight_update()
    assert client.health() and client.generate(PROMPTS, SP)


def test_rejected_distributed_update_leaves_weights_untouched_and_group_usable(client, model):
    before = served(client)
    perturb(model, 3)
    renamed = lambda n: "model.not_a_weight" if n == "model.norm.weight" else n  # noqa: E731
    bad = WeightSync(client, "distributed", bucket_mb=1000, timeout_s=20, name_map=renamed)
    try:
        with pytest.raises(RolloutError, match="not_a_weight"):
            bad.sync(model)
        client.continue_generation()
        assert served(client) == before  # the one bucket was received in full, then rejected
        bad.name_map = lambda n: n
        bad.sync(model)  # the group survived the rejection
        assert max_diff(client, model) < 1e-5
    finally:
        bad.close()


def test_group_init_errors_name_the_field(client):
    for kwargs, field in [({"backend": "nccl", "rank_offset": 1}, "backend"),
                          ({"backend": "gloo", "rank_offset": 0}, "rank_offset")]:
        with pytest.raises(RolloutError) as err:
            client.init_weights_update_group("127.0.0.1", 1, world_size=2, **kwargs)
        assert err.value.status == 400 and err.value.field == field
    with client.weight_update_session(), pytest.raises(RolloutError) as err:
        client.update_weights_from_distributed(["lm_head.weight"], ["float32"], [[1]], group_name="nope")
    assert err.value.field == "group_name"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["distributed", "tensor"])
def test_dead_server_is_an_error_then_restart_and_resync(server, client, model, method):
    sync = WeightSync(client, method, bucket_mb=0.05, timeout_s=10)
    sync.sync(model)
    server.proc.kill()
    server.proc.wait(10)
    if method == "distributed":  # the group itself: a dead peer is an error within the timeout
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            torch.distributed.broadcast(torch.zeros(1 << 20), src=0, group=sync.transport._group)
        assert time.monotonic() - start < 15
    with pytest.raises(RolloutError, match=server.url):
        sync.sync(model)
    server.restart()  # fresh weights from the model directory ...
    perturb(model, 4)
    sync.reconnect()
    sync.sync(model)  # ... and the trainer's weights again after a re-sync
    assert max_diff(client, model) < 1e-5
    sync.close()


def test_tensor_codec_round_trip_is_standard_safetensors():
    from safetensors.torch import load

    named = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
             "d": torch.tensor(True), "e": torch.empty(0, 4), "f": torch.randn(4, 6)[:, ::2]}  # non-contiguous
    blob = tensor_codec.serialize(named)
    back = load(bytes(blob))  # the reference reader agrees with our writer
    assert set(back) == set(named)
    for k, v in named.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    decoded = tensor_codec.decode(tensor_codec.encode(named))
    assert all(torch.equal(decoded[k], v) for k, v in named.items())
    with pytest.raises(tensor_codec.CodecError):
        tensor_codec.decode("not base64 at all!")
    # Our reader agrees with the reference writer too (metadata, its own layout), with views, not copies.
    from safetensors.torch import save

    ref = {k: v.contiguous() for k, v in named.items()}
    back = tensor_codec.parse(save(ref, metadata={"format": "pt"}))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ref.items())
    assert tensor_codec.parse(bytes(blob))["a"]._base is not None
    # A reused buffer: the blob is written into it when it fits.
    buf = torch.empty(1 << 16, dtype=torch.uint8)
    view = tensor_codec.serialize(named, out=buf)
    assert view.nbytes == len(blob) and bytes(view) == bytes(blob) and buf[:8].tolist() == list(bytes(blob)[:8])


def test_stream_decoder_lands_any_chunking_in_the_destinations():
    import random

    named = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
             "d": torch.tensor(True), "e": torch.empty(0, 4)}
    parts = tensor_codec.blob_parts(named)  # the zero-copy form sends the same bytes as serialize()
    blob = b"".join(bytes(p) for p in parts)
    assert blob == bytes(tensor_codec.serialize(named))
    rng = random.Random(0)
    for _ in range(30):
        dests = {}
        dec = tensor_codec.StreamDecoder(len(blob), lambda specs: [dests.setdefault(
            s.name, torch.empty(s.shape, dtype=s.dtype)) for s in specs])
        at = 0
        while at < len(blob):
            step = rng.randint(1, 64)
            dec.feed(blob[at:at + step])
            at += step
        out = dec.finish()
        assert list(out) == list(named) and all(out[k] is dests[k] and torch.equal(out[k], v) for k, v in named.items())
    short = tensor_codec.StreamDecoder(len(blob) + 8, lambda specs: [torch.empty(s.shape, dtype=s.dtype) for s in specs])
    short.feed(blob)
    with pytest.raises(tensor_codec.CodecError, match="data bytes"):  # the header says less than declared
        short.finish()
    refused = tensor_codec.StreamDecoder(len(blob), lambda specs: (_ for _ in ()).throw(ValueError("no such weight")))
    refused.feed(blob)  # the rest is read and dropped, then the refusal is raised
    assert refused.received == len(blob)
    with pytest.raises(ValueError, match="no such weight"):
        refused.finish()
    with pytest.raises(tensor_codec.CodecError, match="longer"):
        refused.feed(b"x")


def _blob_with(header: dict, data: bytes) -> bytes:
    import json
    import struct

    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize("blob, message", [
    (b"short", "too short"),
    (b"\xff" * 8 + b"{}", "header length"),
    (_blob_with([], b""), "not a JSON object"),
    (b"\x04\0\0\0\0\0\0\0{{{{", "not JSON"),
    (_blob_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "data bytes"),
    (_blob_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8 bytes"),
    (_blob_with({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_blob_with({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (_blob_with({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "no gap or overlap"),
    (_blob_with({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "no gap or overlap"),
    (_blob_with({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype, shape and data_offsets"),
    (_blob_with({"__metadata__": {"k": 1}}, b""), "__metadata__"),
])
def test_tensor_codec_rejects_malformed_blobs(blob, message):
    from safetensors.torch import load

    with pytest.raises(tensor_codec.CodecError, match=message):
        tensor_codec.parse(blob)
    with pytest.raises(Exception):  # the reference reader refuses them as well
        load(blob)


def test_long_strings_are_lifted_only_when_plain():
    import json

    from at_rollout.server.models import lift_long_strings

    body = json.dumps({"a": "x" * 50, "b": ["y" * 50, "short", 'q\\"' + "z" * 50], "c": 'he said "hi"'}).encode()
    skeleton, lifted = lift_long_strings(body, min_len=40)
    parsed = json.loads(skeleton)
    assert [bytes(lifted[parsed["a"]]), bytes(lifted[parsed["b"][0]])] == [b"x" * 50, b"y" * 50]
    assert parsed["b"][1:] == ["short", 'q\\"' + "z" * 50] and parsed["c"] == 'he said "hi"'  # escapes untouched
    assert lift_long_strings(b'{"a": "unterminated', min_len=4) == (b'{"a": "unterminated', {})


def test_truncated_weight_update_is_a_400(server, client):
    blob = tensor_codec.encode({"lm_head.weight": torch.zeros(2)})
    with client.weight_update_session():
        r = requests.post(server.url + "/update_weights_from_tensor", timeout=30,
                          data=b'{"load_format": "safetensors", "serialized_named_tensors": ["' + blob.encode() + b'"')
    assert r.status_code == 400 and "malformed JSON" in r.json()["message"]


@pytest.mark.timeout(120)
def test_fp32_trainer_into_a_bf16_server_casts_to_the_served_dtype(tiny_model_dir, tmp_path, model):
    with LocalServer(tiny_model_dir, extra_args=["--dtype", "bfloat16"], log_file=tmp_path / "bf16.log") as srv:
        client = srv.client(timeout_s=60)
        assert client.model_info()["dtype"] == "bfloat16"
        perturb(model, 5)
        reference = copy.deepcopy(model).to(torch.bfloat16)  # what the server should serve after the sync
        before = max_diff(client, reference)
        for method in ("tensor", "distributed"):
            sync = WeightSync(client, method, bucket_mb=0.05, timeout_s=20)
            sync.sync(model)  # fp32 weights, cast on the way
            sync.close()
            after = max_diff(client, reference)
            assert after < 0.05 < before, (method, before, after)
