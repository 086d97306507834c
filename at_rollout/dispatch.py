"""Rollout requests at scale: per prompt group, many in flight, each to the least-loaded engine.

One `/generate` per engine holding a whole step (1,024 samples of up to 24K tokens) makes the
slowest shard the step's length and outlives any read timeout. Instead a step is cut into
chunks of `groups_per_request` prompt groups (a group: one prompt, its n samples); each
engine holds at most `max_in_flight_groups` groups, and the next chunk goes to the live
engine with the fewest groups outstanding, so the engines that finish early take the rest
of the queue. `groups_per_request=0` (auto) is 1 for a backend that batches continuously (SGLang) (a
finished group frees its slot at once), and an engine's whole share for our server, which
runs each merged call to its longest row: there many small requests only cost more calls
(docs/benchmarks.md, "Rollout dispatch").

- Determinism: group g's samples are seeded from (the step's `sampling_seed`, g[, sample]),
  so which engine serves a chunk, and when, changes no sample. (Our server seeds a request's
  rows by position too, so a chunk's make-up matters: it is fixed by the config.)
- Liveness, not timeouts: generation has no read timeout; every `probe_interval_s` the
  engines with work in flight are probed (`/health_generate`, which SGLang and our server
  answer at once while they are busy); `probe_failures` failed probes in a row, or a failed
  request followed by a failed probe, make an engine dead. Its chunks go back to the queue
  for the live engines; with none left, `EnginesDown` carries what is done, and the caller
  restarts the engines, re-syncs the weights and dispatches only the rest.
- A refusal (4xx) is final and raised at once. With `router` (a running sglang-router in
  front of the engines) every chunk goes to it and it picks the engine; weight syncs still
  go to the engines themselves.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .client import Sample, RolloutClient, RolloutError

log = logging.getLogger(__name__)


class EnginesDown(RolloutError):
    """No engine is left alive; `done` maps group index -> samples of the groups that finished."""

    def __init__(self, message: str, done: Dict[int, List[Sample]]):
        super().__init__(message)
        self.done = done


def group_seed(step_seed: int, group: int, sample: Optional[int] = None) -> int:
    """A 31-bit sampling seed for one group (or one of its samples), from the step's seed."""
    key = f"{int(step_seed)}:{int(group)}" + ("" if sample is None else f":{int(sample)}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & 0x7FFFFFFF


def chunk_groups(groups: Sequence[int], per_request: int) -> List[List[int]]:
    per_request = max(1, int(per_request))
    return [list(groups[i:i + per_request]) for i in range(0, len(groups), per_request)]


class Dispatcher:
    """Generation over several engines (or one router) of one `backend` (default: our server).
    A backend that `seeds_samples_alike` (SGLang) gets each group as n one-sample entries with
    seeds of their own; one with `continuous_batching` gets one group per request by default."""

    def __init__(self, clients: Sequence[RolloutClient], *, backend=None, groups_per_request: int = 1,
                 max_in_flight_groups: int = 32, probe_interval_s: float = 10.0, probe_timeout_s: float = 30.0,
                 probe_failures: int = 2, max_resubmits: int = 3, router: Optional[RolloutClient] = None):
        if not clients and router is None:
            raise ValueError("the dispatcher needs at least one engine")
        # Generation waits as long as it takes (no read timeout) and is never retried by the
        # client: the dispatcher decides where a failed chunk goes.
        self.engines = [_generation_client(c) for c in ([router] if router is not None else clients)]
        self.probes = [router] if router is not None else list(clients)
        if backend is None:
            from .backends import get_backend

            backend = get_backend("server")
        self.backend = backend
        self.routed = router is not None
        self.groups_per_request = int(groups_per_request)  # 0: auto (see the module's docstring)
        self.cap = 10**9 if router is not None else max(1, int(max_in_flight_groups))
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.probe_failures = max(1, probe_failures)
        self.max_resubmits = max_resubmits
        self.alive = [True] * len(self.engines)
        self.served = [0] * len(self.engines)  # groups each engine answered (for the benchmark and logs)
        self.requests = [0] * len(self.engines)  # and in how many requests

    @property
    def dead(self) -> List[int]:
        return [i for i, ok in enumerate(self.alive) if not ok]

    def revive(self) -> None:
        """After the caller restarted the dead engines and re-synced the weights."""
        self.alive = [True] * len(self.engines)

    # ---------------------------------------------------------------- one step
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Mapping | Sequence[Mapping],
                 groups: Optional[Sequence[int]] = None) -> Dict[int, List[Sample]]:
        """Samples of each group in `groups` (default: all prompts), by group index. `params`
        is one sampling-params dict for every group or one per prompt."""
        groups = list(range(len(prompt_ids)) if groups is None else groups)
        per_group = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompt_ids)
        per_request = self.groups_per_request or (1 if self.backend.continuous_batching or self.routed
                                                  else -(-len(groups) // len(self.engines)))
        queue = deque(chunk_groups(groups, per_request))
        done: Dict[int, List[Sample]] = {}
        inflight: Dict[Future, tuple] = {}
        load = [0] * len(self.engines)
        resubmits: Dict[int, int] = {}
        misses = [0] * len(self.engines)
        last_probe = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=min(256, max(1, len(groups))), thread_name_prefix="rollout")
        try:
            while queue or inflight:
                while queue:
                    live = [e for e in range(len(self.engines)) if self.alive[e]
                            and (load[e] == 0 or load[e] + len(queue[0]) <= self.cap)]
                    if not live:
                        break
                    e = min(live, key=lambda i: (load[i], i))
                    chunk = queue.popleft()
                    fut = pool.submit(self._request, e, [prompt_ids[g] for g in chunk], [per_group[g] for g in chunk],
                                      chunk)
                    inflight[fut] = (e, chunk)
                    load[e] += len(chunk)
                if not any(self.alive):
                    raise EnginesDown(f"every rollout engine is down ({', '.join(c.url for c in self.engines)}); "
                                      f"{len(done)} of {len(groups)} groups done", done)
                finished, _ = wait(list(inflight), timeout=self.probe_interval_s, return_when=FIRST_COMPLETED)
                for fut in finished:
                    if fut not in inflight:  # its engine was buried a moment ago: already queued again
                        continue
                    e, chunk = inflight.pop(fut)
                    load[e] -= len(chunk)
                    try:
                        for g, samples in zip(chunk, fut.result()):
                            done[g] = samples
                        self.served[e] += len(chunk)
                        self.requests[e] += 1
                        misses[e] = 0
                    except RolloutError as err:
                        if err.refused:
                            raise
                        key = chunk[0]
                        resubmits[key] = resubmits.get(key, 0) + 1
                        if resubmits[key] > self.max_resubmits:
                            raise RolloutError(f"groups {chunk} failed {resubmits[key]} times; last: {err}",
                                               err.status) from None
                        log.warning("rollout request to %s failed (%s); the groups go back to the queue",
                                    self.engines[e].url, err)
                        queue.appendleft(chunk)
                        if not self._probe(e):
                            self._bury(e, inflight, load, queue)
                if time.monotonic() - last_probe >= self.probe_interval_s:
                    last_probe = time.monotonic()
                    busy = [e for e in range(len(self.engines)) if self.alive[e] and load[e] > 0]
                    for e, ok in zip(busy, pool_map(self._probe, busy)):
                        misses[e] = 0 if ok else misses[e] + 1
                        if misses[e] >= self.probe_failures:
                            self._bury(e, inflight, load, queue)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # requests to a buried engine are abandoned
        return done

    def _bury(self, e: int, inflight: Dict[Future, tuple], load: List[int], queue: deque) -> None:
        log.warning("rollout engine %s is not alive; its groups go to the others", self.engines[e].url)
        self.alive[e] = False
        for fut, (owner, chunk) in list(inflight.items()):
            if owner == e:
                inflight.pop(fut)
                queue.appendleft(chunk)
        load[e] = 0

    def _probe(self, e: int) -> bool:
        return self.probes[e].health(self.probe_timeout_s)

    def _request(self, e: int, prompts, params: List[Mapping], groups: List[int]) -> List[List[Sample]]:
        """One /generate for a chunk; the samples of each of its groups, in order."""
        client = self.engines[e]
        if not self.backend.seeds_samples_alike:
            sp = [_seeded(p, group_seed(p["sampling_seed"], g) if p.get("sampling_seed") is not None else None)
                  for p, g in zip(params, groups)]
            out = client.generate(prompts, sp)
        else:
            expanded, sp = [], []
            for prompt, p, g in zip(prompts, params, groups):
                for j in range(int(p.get("n", 1))):
                    expanded.append(prompt)
                    seed = group_seed(p["sampling_seed"], g, j) if p.get("sampling_seed") is not None else None
                    sp.append(_seeded({**p, "n": 1}, seed))
            out = client.generate(expanded, sp)
            owner = [i for i, p in enumerate(params) for _ in range(int(p.get("n", 1)))]
            for s in out:
                s.prompt_index = owner[s.prompt_index]
        grouped: List[List[Sample]] = [[] for _ in groups]
        for s in out:
            grouped[s.prompt_index].append(s)
            s.prompt_index = groups[s.prompt_index]
        return grouped


def _seeded(params: Mapping, seed: Optional[int]) -> Dict[str, Any]:
    out = dict(params)
    if seed is None:
        out.pop("sampling_seed", None)
    else:
        out["sampling_seed"] = seed
    return out


def _generation_client(client: RolloutClient) -> RolloutClient:
    gen = copy.copy(client)
    gen.timeout_s = None  # requests' (connect, None): no read timeout
    gen.retries = 0
    return gen


def pool_map(fn, items) -> list:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))
