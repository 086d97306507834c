"""Per-group dispatch over real server processes: determinism, liveness, dead engines, refusals."""
import os
import signal
import time

import pytest

from at_core.config import load_config
from at_core.rollout import RolloutWorkers
from at_rollout.client import RolloutClient, RolloutError
from at_rollout.backends import get_backend
from at_rollout.dispatch import Dispatcher, EnginesDown, chunk_groups, group_seed
from at_rollout.backends.own_server import LocalServer

PROMPTS = [[1, 5, 9, 11], [1, 7, 7], [1, 20, 21, 22, 23], [1, 3], [1, 8, 8, 8], [1, 30, 2]]
PARAMS = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "n": 2, "sampling_seed": 11}


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    ss = [LocalServer(tiny_model_dir).start() for _ in range(2)]
    yield ss
    for s in ss:
        s.stop()


def _ids(done):
    return {g: [s.output_ids for s in samples] for g, samples in done.items()}


def test_group_seeds_are_stable_and_distinct():
    assert group_seed(11, 3) == group_seed(11, 3) != group_seed(11, 4) != group_seed(12, 3)
    assert len({group_seed(5, g, j) for g in range(50) for j in range(8)}) == 400
    assert chunk_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("sglang", [False, True])
def test_results_do_not_depend_on_engines_or_order(servers, sglang):
    clients = [s.client() for s in servers]
    two = Dispatcher(clients, backend=get_backend('sglang' if sglang else 'server'), max_in_flight_groups=1).generate(PROMPTS, PARAMS)
    one = Dispatcher(clients[:1], backend=get_backend('sglang' if sglang else 'server')).generate(PROMPTS, PARAMS)
    backwards = Dispatcher(clients[::-1], backend=get_backend('sglang' if sglang else 'server'), max_in_flight_groups=2).generate(
        PROMPTS, PARAMS, groups=list(range(len(PROMPTS)))[::-1])
    assert sorted(two) == list(range(len(PROMPTS))) and all(len(v) == 2 for v in two.values())
    assert all(s.prompt_index == g for g, v in two.items() for s in v)
    assert _ids(two) == _ids(one) == _ids(backwards)
    assert len({tuple(s.output_ids) for v in two.values() for s in v}) > len(PROMPTS)  # samples differ


def test_both_engines_serve_with_a_small_in_flight_cap(servers):
    d = Dispatcher([s.client() for s in servers], max_in_flight_groups=1)
    d.generate(PROMPTS, {**PARAMS, "max_new_tokens": 12, "ignore_eos": True})
    assert sum(d.served) == len(PROMPTS) and min(d.served) >= 1, d.served


def test_a_hung_engine_fails_its_probes_and_its_groups_go_elsewhere(servers):
    clients = [s.client() for s in servers]
    want = _ids(Dispatcher(clients[:1]).generate(PROMPTS, PARAMS))
    os.kill(servers[1].proc.pid, signal.SIGSTOP)  # alive process, no answers: only liveness can tell
    try:
        d = Dispatcher(clients, max_in_flight_groups=2, probe_interval_s=0.5, probe_timeout_s=1.0)
        start = time.monotonic()
        got = d.generate(PROMPTS, PARAMS)
        assert d.dead == [1] and d.served[1] == 0 and time.monotonic() - start < 60
        assert _ids(got) == want  # the hung engine's groups, served elsewhere, came out the same
    finally:
        os.kill(servers[1].proc.pid, signal.SIGCONT)


def test_a_bad_request_fails_at_once_with_the_servers_message(servers):
    d = Dispatcher([s.client() for s in servers])
    with pytest.raises(RolloutError) as err:
        d.generate([[1, 2], [1, 10**7]], PARAMS)
    assert err.value.refused and err.value.status == 400 and "10000000" in str(err.value), str(err.value)
    assert d.alive == [True, True]


def test_every_engine_down_keeps_the_finished_groups(tiny_model_dir):
    s = LocalServer(tiny_model_dir).start()
    c = s.client()
    first = Dispatcher([c]).generate(PROMPTS[:2], PARAMS)
    s.stop()
    d = Dispatcher([c], probe_interval_s=0.5, probe_timeout_s=1.0)
    with pytest.raises(EnginesDown) as err:
        d.generate(PROMPTS, PARAMS)
    assert err.value.done == {} and d.dead == [0]
    assert sorted(first) == [0, 1]


def test_workers_restart_a_dead_server_and_send_only_the_rest(tiny_model_dir, tmp_path):
    cfg = load_config(overrides=["rollout.backend=server", "rollout.retries=2"])
    workers = RolloutWorkers(cfg.rollout, str(tiny_model_dir), tmp_path, rank=0)
    workers.start()
    try:
        want = workers.generate(PROMPTS, PARAMS, None)
        workers.servers[0].proc.kill()
        workers.servers[0].proc.wait()
        got = workers.generate(PROMPTS, PARAMS, None)  # every engine down -> restart -> the groups again
        assert workers.restarts == 1 and workers.servers[0].alive()
        assert [[s.output_ids for s in g] for g in got] == [[s.output_ids for s in g] for g in want]
    finally:
        workers.close()


def test_router_takes_every_chunk(servers):
    # a router is one more URL that answers /generate and /health_generate: stand in with a server
    d = Dispatcher([s.client() for s in servers], router=RolloutClient(servers[0].url))
    out = d.generate(PROMPTS, PARAMS)
    assert d.served == [len(PROMPTS)] and sorted(out) == list(range(len(PROMPTS)))


def test_auto_chunks_give_our_server_whole_shares_and_sglang_single_groups(servers):
    clients = [s.client() for s in servers]
    ours = Dispatcher(clients, groups_per_request=0)
    ours.generate(PROMPTS, PARAMS)
    assert ours.served == [3, 3] and ours.requests == [1, 1]  # one request of 3 groups per engine
    sgl = Dispatcher(clients, backend=get_backend('sglang'), groups_per_request=0, max_in_flight_groups=1)
    out = sgl.generate(PROMPTS, PARAMS)
    assert sum(sgl.requests) == len(PROMPTS) and all(len(v) == 2 for v in out.values())
