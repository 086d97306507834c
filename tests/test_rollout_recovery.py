"""Recovery against a live server process (ours): a weight-update group left behind by a
trainer that died, a request the server refuses (4xx: fails at once with its message, no
restart), rollouts made with stale weights (refused, re-synced, generated again), and the
session rule (an update outside a session is refused and receives nothing)."""
from __future__ import annotations

import time

import pytest

from at_core.config import load_config
from at_core.rollout import RolloutWorkers
from at_rollout.client import RolloutError
from at_rollout.dist_group import destroy_group
from at_rollout.weight_sync import WeightSync

SP = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "n": 2, "sampling_seed": 5}


@pytest.fixture
def client(server):
    return server.client(timeout_s=60, retries=1, backoff_s=0.1)


def workers_for(server, tmp_path, *overrides):
    cfg = load_config(overrides=[f"rollout.urls=[{server.url}]", "rollout.retries=2", *overrides])
    return RolloutWorkers(cfg.rollout, "unused", tmp_path, rank=0)


@pytest.mark.timeout(120)
def test_a_group_left_on_a_live_server_is_destroyed_before_re_init(client, model):
    old = WeightSync(client, "distributed", bucket_mb=1, timeout_s=20)
    old.sync(model)
    destroy_group(old.transport._group)  # the trainer's end of the group is gone (it died, or tore down
    old.transport._group = None  # only its own side, as reconnect did); the server still holds the group
    with pytest.raises(RolloutError, match="already exists"):  # what a bare re-init meets
        client.init_weights_update_group("127.0.0.1", 1, 1, 2, backend="gloo")
    new = WeightSync(client, "distributed", bucket_mb=1, timeout_s=20)
    try:
        new.sync(model, weight_version="9")  # destroys the stale group first, then forms its own
        assert client.model_info()["weight_version"] == "9"
        new.reconnect()  # drops the group on the live server and here ...
        new.sync(model)  # ... and the next sync forms a fresh one
    finally:
        new.close()


@pytest.mark.timeout(120)
def test_a_refused_request_fails_at_once_with_the_servers_message(server, tmp_path):
    workers = workers_for(server, tmp_path)
    workers.start()
    try:
        start = time.monotonic()
        with pytest.raises(RolloutError, match="outside the vocabulary") as err:
            workers.generate([[1, 2, 10 ** 6]], SP, None)
        assert err.value.status == 400 and err.value.refused
        assert workers.restarts == 0 and time.monotonic() - start < 10  # no retries, no restarts
        assert "after" not in str(err.value)
    finally:
        workers.close()


@pytest.mark.timeout(180)
def test_stale_rollouts_are_refused_then_regenerated_after_a_re_sync(server, client, model, tmp_path):
    workers = workers_for(server, tmp_path)
    workers.start(model, weight_version=4)
    try:
        out = workers.generate([[1, 5, 9]], SP, model)
        assert {s.weight_version for s in out[0]} == {"4"} and workers.metrics() == {"rollout/weight_version_lag": 0}
        client.update_weight_version("3")  # the server now serves other weights than the trainer synced
        out = workers.generate([[1, 5, 9]], SP, model)  # refused, re-synced under the same name, again
        assert {s.weight_version for s in out[0]} == {"4"} and workers.restarts == 1
        workers.sync(model)  # the next policy: one past the last
        assert workers.weight_version == 5 and client.model_info()["weight_version"] == "5"
    finally:
        workers.close()
    once = workers_for(server, tmp_path, "rollout.retries=0")
    once.start(model, weight_version=7)
    try:
        client.update_weight_version("6")
        with pytest.raises(RolloutError, match=r"stale rollout.*\['6'\].*version 7"):
            once.generate([[1, 5, 9]], SP, model)
    finally:
        once.close()


@pytest.mark.timeout(120)
def test_updates_outside_a_session_are_refused_and_receive_nothing(client, model):
    sync = WeightSync(client, "distributed", bucket_mb=1, timeout_s=20)
    try:
        sync.sync(model)
        start = time.monotonic()
        with pytest.raises(RolloutError, match="no weight-update session is open") as err:
            client.update_weights_from_distributed(["lm_head.weight"], ["float32"], [[4, 4]])
        assert err.value.refused and time.monotonic() - start < 5  # it did not wait for a broadcast
        sync.sync(model)  # and the group still works: nothing was half-received
    finally:
        sync.close()
    with pytest.raises(RolloutError, match="no weight-update session is open"):
        client.end_weight_update()
    client.begin_weight_update()
    try:
        with pytest.raises(RolloutError, match="already open"):
            client.begin_weight_update()
    finally:
        client.end_weight_update()
    info = client.server_info()
    assert info["weight_update_session"] is True and client.needs_weight_update_session()


AGREE = '''
import json, sys, torch, torch.distributed as dist
from at_core.config import load_config
from at_core.rollout import RolloutWorkers
from at_rollout.client import RolloutClient, RolloutError
from at_rollout.weight_sync import WeightSync

dist.init_process_group("gloo")
rank, url, dead = dist.get_rank(), sys.argv[1], sys.argv[2]
seen = {}
def attempt(name, fn):
    try:
        fn()
        seen[name] = None
    except RolloutError as err:
        seen[name] = [err.status, str(err)]
# a 4xx in the middle of a sync (names the server does not serve)
ws = WeightSync(RolloutClient(url) if rank == 0 else None, "tensor", bucket_mb=1)
attempt("sync", lambda: ws.sync(torch.nn.Linear(4, 4)))
if rank == 0:
    RolloutClient(url).continue_generation()
# a 4xx answer to a generation
cfg = load_config(overrides=[f"rollout.urls=[{url}]"]).rollout
workers = RolloutWorkers(cfg, "unused", "/tmp", rank=rank)
workers.start()
attempt("generate", lambda: workers.generate([[1, 10 ** 6]], {"max_new_tokens": 2, "sampling_seed": 1}, None))
seen["restarts"] = workers.restarts
# a server that never answers
cfg = load_config(overrides=[f"rollout.urls=[{dead}]", "rollout.startup_timeout_s=2"]).rollout
attempt("start", lambda: RolloutWorkers(cfg, "unused", "/tmp", rank=rank).start())
for r in range(dist.get_world_size()):  # one rank at a time: torchrun merges the ranks' output
    if r == rank:
        print("RESULT", rank, json.dumps(seen), flush=True)
    dist.barrier()
dist.destroy_process_group()  # leave together: the store's host (rank 0) must not go first
'''


@pytest.mark.timeout(240)
def test_all_ranks_raise_the_same_error_together(server, tmp_path):
    import json

    from helpers import free_port, torchrun

    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    proc = torchrun(script, 2, server.url, f"http://127.0.0.1:{free_port()}", timeout=200)
    results = {int(line.split()[1]): json.loads(line.split(maxsplit=2)[2])
               for line in proc.stdout.splitlines() if line.startswith("RESULT")}
    assert sorted(results) == [0, 1], proc.stdout + proc.stderr[-3000:]
    assert results[0] == results[1]  # same status, same message, on both ranks
    r = results[0]
    assert r["sync"][0] == 400 and "unknown weight name" in r["sync"][1]
    assert r["generate"][0] == 400 and "outside the vocabulary" in r["generate"][1] and r["restarts"] == 0
    assert r["start"][0] is None and "did not answer 200" in r["start"][1]
