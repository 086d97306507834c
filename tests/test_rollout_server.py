"""The rollout server as a real process: SGLang's request/response shapes, validation, auth,
batching, pause/continue, and the process manager's restart."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests

from at_rollout.client import RolloutClient, RolloutError
from at_rollout.backends.own_server import LocalServer

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = LocalServer(tiny_model_dir, api_key=KEY, extra_args=["--max-request-mb", "0.25"],
                      log_file=tmp_path_factory.mktemp("srv") / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout_s=60, retries=1, backoff_s=0.1)


def post(server, path, json=None, data=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.post(server.url + path, json=json, data=data, headers=headers, timeout=60)


def test_generate_speaks_sglang(server):
    # A single prompt with n=1 answers one object; logprobs are [logprob, token_id, null] triples.
    one = post(server, "/generate", {"input_ids": [1, 5, 9, 12], "return_logprob": True,
                                     "sampling_params": {"max_new_tokens": 5, "temperature": 0.8,
                                                         "sampling_seed": 1}}).json()
    assert set(one) == {"text", "output_ids", "meta_info"}
    meta = one["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 5 and isinstance(meta["id"], str)
    assert [t[1] for t in meta["output_token_logprobs"]] == one["output_ids"]
    assert all(t[2] is None and t[0] < 0 for t in meta["output_token_logprobs"])
    # A batch with n=2: a list, n consecutive entries per prompt; text prompts work too.
    batch = post(server, "/generate", {"text": ["hello", "What is 1 + 2?"],
                                       "sampling_params": {"max_new_tokens": 3, "n": 2, "sampling_seed": 4}}).json()
    assert isinstance(batch, list) and len(batch) == 4
    assert "output_token_logprobs" not in batch[0]["meta_info"]  # return_logprob defaults to false
    assert batch[0]["meta_info"]["prompt_tokens"] == batch[1]["meta_info"]["prompt_tokens"]
    assert batch[0]["output_ids"] != batch[1]["output_ids"]


def test_client_generate_and_determinism_across_merged_requests(client):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    sp = {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "sampling_seed": 7}
    ref = client.generate(prompts, sp, return_logprob=True)
    assert [c.prompt_index for c in ref] == [0, 0, 0, 1, 1, 1]
    assert all(len(c.logprobs) == len(c.output_ids) == 6 and c.finish_reason == "length" for c in ref)
    # Four identical requests at once are merged into one batch; each still gets the same samples.
    results = [None] * 4

    def run(i):
        results[i] = client.generate(prompts, sp, return_logprob=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        assert [c.output_ids for c in r] == [c.output_ids for c in ref]


@pytest.mark.parametrize("body,field", [
    ({"input_ids": [1, 2], "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "8"}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 1}, {"n": 0}]}, "sampling_params[1].n"),
    ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "sampling_params.frequency_penalty"),
    ({"input_ids": [1, 10**6]}, "input_ids"),
    ({"input_ids": [[1, 2], []]}, "input_ids[1]"),
    ({"input_ids": [1.5]}, "input_ids[0]"),
    ({"input_ids": [1], "extra": 1}, "extra"),
    ({"text": "a", "input_ids": [1]}, "input_ids"),
    ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len"),
    ({"input_ids": [1], "stream": True}, "stream"),
])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    r = post(server, "/generate", body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()


def test_malformed_oversize_and_unauthorised_requests_then_still_serving(server, client):
    r = post(server, "/generate", data=b'{"input_ids": [1, 2')
    assert r.status_code == 400 and "malformed JSON" in r.json()["message"]
    r = post(server, "/generate", data=b'{"input_ids": [' + b"1," * 200_000 + b"1]}")
    assert r.status_code == 413 and "limit" in r.json()["message"]
    for path in ("/generate", "/update_weights_from_tensor", "/pause_generation", "/model_info"):
        assert post(server, path, {"input_ids": [1]}, key=None).status_code == 401
        assert post(server, path, {"input_ids": [1]}, key="wrong").status_code == 401
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # health needs no key
    with pytest.raises(RolloutError) as err:
        RolloutClient(server.url, retries=0).generate([[1]], {"max_new_tokens": 1})
    assert err.value.status == 401
    r = post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "tempurature": 1.0}})
    assert r.status_code == 400 and r.json()["field"] == "sampling_params.tempurature"
    with pytest.raises(ValueError, match="tempurature"):  # the client refuses it before sending
        client.generate([[1, 2]], {"max_new_tokens": 2, "tempurature": 1.0})
    assert len(client.generate([[1, 2]], {"max_new_tokens": 2})) == 1
    assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200
    info = client.model_info()
    assert info["is_generation"] and info["dtype"] == "float32" and info["vocab_size"] > 0


def wait_until_held(server, timeout_s=20.0):
    """Until the server has a request waiting (its /flush_cache answers 400, as SGLang's does)."""
    deadline = time.monotonic() + timeout_s
    while post(server, "/flush_cache").status_code != 400:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.05)


def test_pause_in_place_holds_requests_and_flush_waits(server, client):
    client.pause_generation("in_place")
    done = []
    t = threading.Thread(target=lambda: done.append(client.generate([[3, 4]], {"max_new_tokens": 3})))
    t.start()
    wait_until_held(server)
    time.sleep(0.2)
    assert not done  # held while paused
    with pytest.raises(RolloutError) as err:  # SGLang's answer while requests wait: 400, retried until timeout
        client.flush_cache(timeout_s=0.5)
    assert err.value.status == 400
    client.continue_generation()
    t.join(30)
    assert done and done[0][0].finish_reason == "length"
    client.flush_cache(timeout_s=5)
    client.release_memory_occupation()
    client.resume_memory_occupation(["weights"])


def test_pause_abort_ends_waiting_requests(server, client):
    got = []

    def gen():
        got.append(client.generate([[3, 4]], {"max_new_tokens": 3}))

    client.pause_generation("in_place")
    t = threading.Thread(target=gen)
    t.start()
    wait_until_held(server)
    client.pause_generation()  # default mode abort, as in SGLang: ends the held request
    t.join(30)
    assert got and got[0][0].finish_reason == "abort" and got[0][0].output_ids == []
    # A request arriving while paused waits for continue_generation, then runs.
    t = threading.Thread(target=gen)
    t.start()
    time.sleep(0.3)
    assert len(got) == 1
    client.continue_generation()
    t.join(30)
    assert len(got) == 2 and got[1][0].finish_reason == "length"


def test_refuses_public_bind_without_api_key(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "at_rollout.server", "--model-path", str(tiny_model_dir),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--api-key" in proc.stderr


def test_start_failure_raises_with_the_log_tail(tmp_path):
    with pytest.raises(RolloutError) as err:
        LocalServer(tmp_path / "missing", startup_timeout_s=60).start()
    assert "config.json" in str(err.value)


def test_restart_after_kill_keeps_the_url(server, client):
    url = server.url
    server.proc.kill()
    server.proc.wait(10)
    assert not server.alive() and not client.health()
    with pytest.raises(RolloutError) as err:
        RolloutClient(url, retries=1, backoff_s=0.05).generate([[1]], {"max_new_tokens": 1})
    assert url in str(err.value)
    server.restart()
    assert server.alive() and server.url == url and client.health()
    assert len(client.generate([[1, 2]], {"max_new_tokens": 2})) == 1


def test_accepted_connections_have_nagle_off():
    """The server's socket says it is TCP, so asyncio sets TCP_NODELAY on every accepted
    connection; without it each small response waited ~40 ms for a delayed ACK."""
    import asyncio
    import socket

    from at_rollout.server.cli import listening_socket

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_server_dying_mid_response_is_a_rollout_error_and_retried():
    """Headers sent, body cut short (a server killed while answering): the client retries and
    then raises RolloutError, which the trainer's recovery handles, not a raw requests error."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    answered = []

    def serve():
        for _ in range(2):  # the first try and its one retry
            conn, _ = sock.accept()
            conn.recv(65536)
            answered.append(1)  # before the reply: the client cannot see the reply before it is counted
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"te")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client = RolloutClient(f"http://127.0.0.1:{sock.getsockname()[1]}", retries=1, backoff_s=0.01)
    with pytest.raises(RolloutError, match="connection broken mid-response"):
        client.generate([[1]], {"max_new_tokens": 1})
    assert len(answered) == 2
    sock.close()
