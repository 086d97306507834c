"""The trainer's handle on its rollout servers: start them, generate, sync weights, recover.

Rank 0 owns the servers (the project's own server on loopback, an SGLang launch, or
already-running URLs) and sends the generation requests; every rank takes part in the
weight sync because ZeRO-3 gathers are collective. Generation goes per prompt group to the
least-loaded live engine (`at_rollout/dispatch.py`): a dead engine's groups go to the others
at once; with none left, all ranks agree on it, rank 0 restarts the servers, everyone
re-syncs the current weights, and only the unfinished groups are sent again (seeded per
group, so they come out as they would have): the step is neither lost nor repeated. An
engine that died while the others finished the step is restarted and re-synced right
after. A 4xx answer (a request
that will never succeed) ends the run at once with the server's message, on every rank.

Every sync names the weights (`weight_version`: the policy's step, counted here unless the
caller gives it); each generation's `meta_info` says which weights made it, and rollouts
made with other weights than the last synced ones are refused (re-synced and generated
again). `metrics()` reports `rollout/weight_version_lag` of the last generation.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from at_rollout.backends import get_backend
from at_rollout.client import RolloutClient, RolloutError, Sample
from at_rollout.process import ManagedServer
from at_rollout.weight_sync import WeightSync

__all__ = ["RolloutWorkers", "Sample", "broadcast_from_rank0"]


log = logging.getLogger(__name__)


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's Python object on every rank (a no-op in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RolloutWorkers:
    """Rollout servers of one backend (`rollout.backend`, from the registry in
    `at_rollout.backends`): whatever differs between engines is asked of that object."""

    def __init__(self, rcfg: DictConfig, model_path: str, out_dir: str | Path, rank: int, seed: int = 0):
        self.cfg = rcfg
        self.backend = get_backend(rcfg.backend)  # everything engine-specific is asked of it
        self.model_path = model_path
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.seed = seed
        self.servers: List[ManagedServer] = []
        self.clients: List[RolloutClient] = []
        self.weight_sync: Optional[WeightSync] = None
        self.restarts = 0
        self.weight_version: Optional[int] = None  # of the last completed sync
        self.last_weight_version_lag: Optional[int] = None  # of the last generation (0: fresh)

    # ---------------------------------------------------------------- lifecycle
    def start(self, module=None, weight_version: int = 0) -> None:
        """Rank 0 launches (or connects to) the servers; then all ranks push the actor's weights
        (named `weight_version`: the policy's global step). A server that never comes up
        raises the same RolloutError on every rank."""
        error = None
        if self.rank == 0:
            try:
                self._launch()
            except RolloutError as err:
                error = (str(err), err.status)
        _raise_agreed(broadcast_from_rank0(error))
        if module is not None:
            self.sync(module, weight_version)

    def _weight_sync(self) -> WeightSync:
        """Built at the first sync (collective), with the transport the backend picks: serving a
        directory's own weights (evaluation) needs none, whatever rollout.sync_method says."""
        if self.weight_sync is None:
            engines = broadcast_from_rank0(len(self.clients))  # every rank builds the transport alike
            self.weight_sync = WeightSync(self.clients if self.rank == 0 else None,
                                          self.backend.transport(self.cfg, engines), self.cfg.sync_bucket_mb,
                                          timeout_s=self.cfg.request_timeout_s)
        return self.weight_sync

    def _launch(self) -> None:
        kw = dict(api_key=self.cfg.api_key, timeout_s=self.cfg.request_timeout_s, retries=self.cfg.retries)
        if self.cfg.urls:
            self.clients = [self.backend.client(u, **kw) for u in self.cfg.urls]
            for c in self.clients:
                c.wait_for_health(self.cfg.startup_timeout_s)
            return
        engines, threads = launch_plan(self.cfg, torch.get_num_threads())
        logs = ["rollout_server.log"] if engines == 1 else [f"rollout_server{i}.log" for i in range(engines)]
        self.servers = [self.backend.server(self.cfg, self.model_path, seed=self.seed, log_file=self.out_dir / log,
                                            threads=threads) for log in logs]
        try:  # side by side: each start is mostly the child's imports
            with ThreadPoolExecutor(max_workers=engines) as pool:
                list(pool.map(lambda s: s.start(), self.servers))
        except RolloutError:
            self.close()
            raise
        self.clients = [self.backend.client(s.url, **kw) for s in self.servers]
        log.info("%d rollout engine(s) up, %s torch threads each", engines, threads or "inherited")

    def close(self) -> None:
        if self.weight_sync is not None:
            self.weight_sync.close()
        for s in self.servers:
            s.stop()

    # ---------------------------------------------------------------- colocated mode
    def release(self) -> None:
        """Colocated engines free their weights and KV cache for the update (rank 0)."""
        if self.rank == 0:
            self.backend.release(self.cfg, self.clients)

    def resume(self) -> None:
        """Colocated engines take the memory back before the new weights arrive (rank 0)."""
        if self.rank == 0:
            self.backend.resume(self.cfg, self.clients)

    # ---------------------------------------------------------------- the two operations
    def sync(self, module, weight_version: Optional[int] = None) -> None:
        """Push the actor's weights (collective), named `weight_version` (default: one past the
        last); a server that died meanwhile is restarted first. A refusal (4xx) is final."""
        if weight_version is None:
            weight_version = 0 if self.weight_version is None else self.weight_version + 1
        for attempt in range(self.cfg.retries + 1):
            try:
                self._weight_sync().sync(module, weight_version=str(weight_version))
                self.weight_version = int(weight_version)
                return
            except RolloutError as err:  # raised on every rank together, with the same status
                if err.refused or attempt == self.cfg.retries:
                    raise
                self._restart_dead(str(err))

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Dict[str, Any], module) -> List[List[Sample]]:
        """n samples per prompt, grouped by prompt; collective (the result reaches every rank)."""
        self._partial: Dict[int, List[Sample]] = {}  # group -> samples, kept across attempts
        for attempt in range(self.cfg.retries + 1):
            result, error, dead = None, None, []
            if self.rank == 0:
                try:
                    result = self._generate_on_servers(prompt_ids, params)
                    dead = [self.clients[e].url for e in self._dispatcher.dead] if not self.cfg.router_url else []
                    try:
                        self.last_weight_version_lag = self._check_versions(result)
                    except RolloutError:
                        self._partial = {}  # made with other weights: all of it again
                        raise
                except RolloutError as err:
                    error = (str(err), err.status)
            error = broadcast_from_rank0(error)
            if error is None:
                result, dead = broadcast_from_rank0((result, dead))
                if dead:  # the live engines finished the step; bring the dead back before the next
                    self._recover(module, f"rollout engine(s) {', '.join(dead)} died during the rollout")
                return result
            if attempt == self.cfg.retries or RolloutError(*error).refused:
                _raise_agreed(error, "" if attempt == 0 else f"rollout failed after {attempt + 1} attempts: ")
            self._recover(module, error[0])
        raise AssertionError("unreachable")

    def metrics(self) -> Dict[str, float]:
        """`rollout/weight_version_lag` of the last generation (rank 0; empty before one)."""
        lag = self.last_weight_version_lag
        return {} if lag is None else {"rollout/weight_version_lag": float(lag)}

    def _check_versions(self, result: List[List[Sample]]) -> Optional[int]:
        """The largest lag (synced version minus the one each sample names); any lag refuses
        the rollout: it was made with weights the trainer no longer has."""
        if self.weight_version is None:
            return None  # never synced: serving the directory's own weights (evaluation)
        lags = set()
        for s in (s for group in result for s in group):
            v = s.weight_version
            lags.add(self.weight_version - int(v) if v is not None and str(v).lstrip("-").isdigit() else None)
        if None in lags or max(lags, default=0) != 0:
            found = sorted({str(s.weight_version) for g in result for s in g})
            raise RolloutError(f"stale rollout: samples were made with weight version(s) {found}, the trainer "
                               f"synced version {self.weight_version}")
        return max(lags, default=0)

    def _generate_on_servers(self, prompt_ids, params) -> List[List[Sample]]:
        """Per prompt group, many in flight, each to the least-loaded live engine (or through
        `rollout.router_url`); see at_rollout/dispatch.py. Groups finished before every engine
        went down are kept for the next attempt, which (after restart and re-sync) sends the rest."""
        from at_rollout.dispatch import Dispatcher, EnginesDown

        router = self.backend.client(self.cfg.router_url, api_key=self.cfg.api_key) if self.cfg.router_url else None
        self._dispatcher = Dispatcher(self.clients, backend=self.backend, router=router,
                                      groups_per_request=self.cfg.groups_per_request,
                                      max_in_flight_groups=self.cfg.max_in_flight_groups)
        todo = [g for g in range(len(prompt_ids)) if g not in self._partial]
        try:
            self._partial.update(self._dispatcher.generate(prompt_ids, params, todo))
        except EnginesDown as err:
            self._partial.update(err.done)
            raise
        return [self._partial[g] for g in range(len(prompt_ids))]

    def _recover(self, module, error: str) -> None:
        """A server failed: restart the dead ones, then re-sync the current weights (all ranks)."""
        self._restart_dead(error)
        if module is not None:  # None: serving the directory's own weights (evaluation)
            self.sync(module, self.weight_version)  # the same weights again, under the same name

    def _restart_dead(self, error: str) -> None:
        """Rank 0 restarts the dead servers and drops the weight-update group on every live
        one (the next sync forms it anew); a restart that fails raises on every rank."""
        failed = None
        if self.rank == 0:
            log.warning("rollout failed (%s); restarting the server and re-syncing weights", error)
            try:
                for s in self.servers:
                    if not s.alive():
                        s.restart()
                if self.weight_sync is not None:
                    self.weight_sync.reconnect()
            except RolloutError as err:
                failed = (str(err), err.status)
            time.sleep(0.5)
        _raise_agreed(broadcast_from_rank0(failed))
        self.restarts += 1


def launch_plan(rcfg, trainer_threads: int) -> tuple[int, Optional[int]]:
    """(engines to launch, torch threads each; None: inherited) from `rollout.engines` and
    `rollout.engine_threads`. Several engines split the trainer's threads: on CPUs, one
    single-threaded engine per core decodes faster than one engine with every core, whose
    small per-step ops barely use a second thread (docs/rollout.md)."""
    engines = int(rcfg.engines) or max(1, trainer_threads)
    if rcfg.engine_threads:
        return engines, int(rcfg.engine_threads)
    return engines, (None if engines == 1 else max(1, trainer_threads // engines))


def _raise_agreed(error: Optional[tuple], prefix: str = "") -> None:
    """Raise rank 0's (message, status) on this rank, if there is one."""
    if error is not None:
        raise RolloutError(prefix + error[0], error[1])
