"""Bounded, crash-proof grading in worker processes.

Model output is untrusted input to a LaTeX parser and a computer-algebra system:
`\\boxed{9^{9^{9^{9}}}}` can run for ever inside one C call, deep nesting can exhaust the
stack, and math-verify's own timeouts (`signal.alarm`, main thread only, raising a
`BaseException`) do not cover either. So grading runs in worker processes
(`at_reward.zygote`), each item under a wall-clock deadline; a worker that misses it is
SIGKILLed and replaced, a worker that dies is replaced, and the item scores as incorrect.

Why not `multiprocessing.Pool` / `ProcessPoolExecutor`: a hung task holds its slot for
ever and a dead worker breaks the executor. Why not multiprocessing's forkserver: every
child it starts re-imports the parent's `__main__` (the trainer: torch, DeepSpeed). Here a
small "zygote" process imports math-verify once, warms its caches, and forks workers on
request: forking a single-threaded process is safe and takes milliseconds, so starting
or replacing a worker is cheap, and nothing of the (multi-threaded, GPU-holding) trainer
is ever forked.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

from at_reward.grade import Grade
from at_reward.math import extract_answer, gold_alternatives, quick_match, verify_answer
from at_reward.zygote import FnRef


class GradingError(RuntimeError):
    """The pool itself cannot work (grader not importable, zygote will not start)."""


class _Worker:
    def __init__(self, pid: int, conn: Connection):
        self.pid, self.conn = pid, conn
        self.pidfd = None
        try:  # a pidfd can never signal a recycled pid
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class _State:
    """What must be torn down, kept apart from the pool so a finalizer can reach it."""

    def __init__(self):
        self.zygote: Optional[subprocess.Popen] = None
        self.ctrl: Optional[socket.socket] = None
        self.workers: list[_Worker] = []

    def shutdown(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        if self.zygote is not None:
            try:
                self.zygote.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()
            self.zygote = None


class _Todo:
    """Items waiting for a worker, grouped by key so that the items of one key go to one
    worker where possible: math-verify's parse of a gold is cached per worker, and a
    training batch has 8 rollouts per gold. A worker takes (1) an item of a key it owns,
    else (2) the first item of a key nobody owns (and owns it), else (3) any item."""

    def __init__(self, n: int, keys: Optional[Sequence] = None):
        self.keys = keys
        self.by_key: dict[Any, deque] = {}
        for i in range(n):
            self.by_key.setdefault(self._key(i), deque()).append(i)
        self.unowned = deque(self.by_key)
        self.owned: dict[int, deque] = {}
        self.count = n

    def _key(self, i: int) -> Any:
        return self.keys[i] if self.keys is not None else i

    def __bool__(self) -> bool:
        return self.count > 0

    def _pop(self, key: Any) -> int:
        queue = self.by_key[key]
        i = queue.popleft()
        if not queue:
            del self.by_key[key]
        self.count -= 1
        return i

    def take(self, slot: int) -> int:
        mine = self.owned.setdefault(slot, deque())
        while mine:
            if mine[0] in self.by_key:
                return self._pop(mine[0])
            mine.popleft()
        while self.unowned:
            key = self.unowned.popleft()
            if key in self.by_key:
                mine.append(key)
                return self._pop(key)
        return self._pop(next(iter(self.by_key)))

    def put_back(self, i: int) -> None:
        key = self._key(i)
        if key not in self.by_key:
            self.by_key[key] = deque()
            if not any(key in keys for keys in self.owned.values()):
                self.unowned.appendleft(key)
        self.by_key[key].appendleft(i)
        self.count += 1


class GradingPool:
    """Grade (response, gold) pairs in parallel, order preserved, each under `timeout_s`.

    `grader=None` grades math: extraction and the exact/integer shortcuts run here, only
    math-verify runs in the workers. `grader=fn` runs `fn(response, gold) -> Grade | bool`
    (a module-level function) in the workers instead. A timed-out, crashed or raising item
    scores `Grade(correct=False, format_ok=True)`: the response was answered, not graded.
    Not thread-safe across calls (calls are serialised by a lock).
    """

    PIPELINE = 2  # requests queued per worker: one running, one waiting

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        *,
        grader: Optional[Callable[[str, Any], Any]] = None,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 60.0,
        preload: Sequence[str] = (),
        extract: Callable[[str], Optional[str]] = extract_answer,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers, self.timeout_s = int(workers), float(timeout_s)
        try:
            self.grader = FnRef.of(grader) if grader is not None else None
        except ValueError as err:
            raise GradingError(str(err)) from None
        self.memory_limit_mb, self.startup_timeout_s = memory_limit_mb, startup_timeout_s
        self.preload = tuple(preload)
        self.extract = extract  # the answer reading (`at_reward.rules`); runs here, it is cheap
        self.stats = {"graded": 0, "timeouts": 0, "crashes": 0, "errors": 0, "restarts": 0}
        self.last_latency_s: list[float] = []  # per item of the last batch, dispatch to reply
        self._verify_ref = FnRef.of(verify_answer)
        # math-verify's own alarm (whole seconds) fires first where it can, which spares a
        # kill and a fork; the pool's deadline covers what an alarm cannot interrupt.
        self._alarm_s = max(1, int(self.timeout_s // 2))
        self._lock = threading.Lock()
        self._state = _State()
        self._finalizer = weakref.finalize(self, self._state.shutdown)
        self._start_zygote()

    # -- lifecycle

    def _start_zygote(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        paths = [p for p in sys.path if p] + ([os.getcwd()] if "" in sys.path else [])
        grader = None if self.grader is None else (self.grader.module, self.grader.qualname, self.grader.file)
        code = (
            f"import sys; sys.path[:0] = {paths!r}; from at_reward.zygote import zygote_main; "
            f"zygote_main({child.fileno()}, {int(self.memory_limit_mb)}, {list(self.preload)!r}, {grader!r})"
        )
        self._state.zygote = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[child.fileno()], stdin=subprocess.DEVNULL
        )
        child.close()
        self._state.ctrl = parent
        self._zygote_ready = False

    def _recv_ctrl(self, size: int, timeout: float) -> bytes:
        ready, _, _ = select.select([self._state.ctrl], [], [], timeout)
        if not ready:
            raise GradingError(f"grading zygote did not answer within {timeout:.0f}s")
        data = self._state.ctrl.recv(size)
        if not data:
            raise GradingError("grading zygote exited (see its error output above)")
        return data

    def _fork_worker(self) -> _Worker:
        for attempt in range(2):
            try:
                if self._state.ctrl is None:
                    raise GradingError("pool is closed")
                if not self._zygote_ready:
                    self._recv_ctrl(1, self.startup_timeout_s)
                    self._zygote_ready = True
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    socket.send_fds(self._state.ctrl, [b"F"], [theirs.fileno()])
                finally:
                    theirs.close()
                pid = struct.unpack("!q", self._recv_ctrl(8, self.startup_timeout_s))[0]
                return _Worker(pid, Connection(ours.detach()))
            except (OSError, GradingError):
                if attempt or self._state.ctrl is None:
                    raise
                self._restart_zygote()
        raise AssertionError("unreachable")

    def _restart_zygote(self) -> None:
        self.stats["restarts"] += 1
        state = self._state
        if state.ctrl is not None:
            state.ctrl.close()
            state.ctrl = None
        if state.zygote is not None:
            state.zygote.kill()
            state.zygote.wait()
        self._start_zygote()

    def _ensure_workers(self) -> None:
        while len(self._state.workers) < self.workers:
            self._state.workers.append(self._fork_worker())

    def _discard(self, w: _Worker) -> None:
        """Kill `w` and let the zygote reap it (until then its pid cannot be reused)."""
        w.kill()
        try:
            self._state.ctrl.send(b"W" + struct.pack("!q", w.pid))
        except (OSError, AttributeError):
            pass

    def _retire(self, w: _Worker) -> _Worker:
        """Discard `w` and put a fresh worker in its place."""
        self._discard(w)
        new = self._fork_worker()
        self._state.workers[self._state.workers.index(w)] = new
        return new

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (started on first use)."""
        return [w.pid for w in self._state.workers]

    def zygote_pid(self) -> Optional[int]:
        return self._state.zygote.pid if self._state.zygote is not None else None

    def close(self) -> None:
        """Stop the workers and the zygote. Safe to call twice."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running

    def map(self, fn: Callable, items: Sequence[tuple], fallback: Any) -> list:
        """`[fn(*args) for args in items]` in the workers; `fallback` where an item failed."""
        try:
            ref = FnRef.of(fn)
        except ValueError as err:
            raise GradingError(str(err)) from None
        return self._run(ref, items, fallback)

    def _run(self, ref: FnRef, items: Sequence[tuple], fallback: Any, keys: Optional[Sequence] = None) -> list:
        results = [fallback] * len(items)
        latency = [0.0] * len(items)
        todo = _Todo(len(items), keys)
        with self._lock:
            if not self._finalizer.alive:
                raise GradingError("pool is closed")
            self._ensure_workers()
            queues: dict[_Worker, deque] = {}
            try:
                self._dispatch(ref, items, todo, queues, results, latency)
            finally:
                # Interrupted (Ctrl-C, an error): a worker with work queued would answer this
                # batch's items to the next batch's requests, so it goes.
                for w, queue in queues.items():
                    if queue and w in self._state.workers:
                        self._discard(w)
                        self._state.workers.remove(w)
        self.stats["graded"] += len(items)
        self.last_latency_s = latency
        return results

    def _dispatch(self, ref, items, todo: _Todo, queues: dict, results: list, latency: list) -> None:
        """Keep `PIPELINE` requests queued at every worker until `todo` is empty.

        A worker answers its queue in order, so the head item's clock starts when the
        previous answer arrives (or when it was sent to an idle worker); a worker whose head
        item passes `timeout_s` is killed and replaced, and the items queued behind it go
        back to `todo`. Queueing a second request spares the worker a wake-up round trip
        per item, which is most of the cost of small items on a busy machine.
        """

        def requeue(queue: deque) -> None:
            while queue:
                todo.put_back(queue.pop()[0])

        while todo or any(queues.values()):
            for slot, w in enumerate(list(self._state.workers)):
                queue = queues.setdefault(w, deque())
                while todo and len(queue) < self.PIPELINE:
                    i = todo.take(slot)
                    try:
                        w.conn.send((ref, items[i]))
                    except OSError:  # the worker is gone: the item being sent never ran
                        todo.put_back(i)
                        if queue:  # it died on its head item, as on the EOF path below: no retry
                            head, t0 = queue.popleft()
                            latency[head] = time.monotonic() - t0
                        requeue(queue)
                        self.stats["crashes"] += 1
                        del queues[w]
                        self._retire(w)
                        break
                    queue.append([i, time.monotonic() if not queue else None])
            active = {w.conn: w for w, queue in queues.items() if queue}
            if not active:
                continue
            deadline = min(q[0][1] for q in queues.values() if q) + self.timeout_s
            for conn in wait(list(active), timeout=max(0.0, deadline - time.monotonic())):
                w = active[conn]
                queue = queues[w]
                try:
                    while queue and conn.poll(0):
                        status, payload = conn.recv()
                        i, t0 = queue.popleft()
                        now = time.monotonic()
                        latency[i] = now - t0
                        if queue:
                            queue[0][1] = now
                        if status == "ok":
                            results[i] = payload
                        elif status == "unresolved":
                            raise GradingError(f"grader cannot be imported in the worker: {payload}")
                        else:
                            self.stats["errors"] += 1
                except (EOFError, OSError):  # the worker died on its head item
                    i, t0 = queue.popleft()
                    latency[i] = time.monotonic() - t0
                    requeue(queue)
                    self.stats["crashes"] += 1
                    del queues[w]
                    self._retire(w)
            now = time.monotonic()
            for w, queue in list(queues.items()):
                if queue and now - queue[0][1] >= self.timeout_s:
                    i, t0 = queue.popleft()
                    latency[i] = now - t0
                    requeue(queue)
                    self.stats["timeouts"] += 1
                    del queues[w]
                    self._retire(w)

    def grade_batch(self, pairs: Sequence[tuple[str, Any]]) -> list[Grade]:
        """Grade `(response, gold)` pairs; the result list matches the input order."""
        if self.grader is not None:
            raw = self._run(self.grader, [(r, g) for r, g in pairs], None)
            return [_as_grade(x) for x in raw]
        grades: list[Optional[Grade]] = [None] * len(pairs)
        jobs, where = [], []
        for i, (response, gold) in enumerate(pairs):
            golds = gold_alternatives(gold)
            answer = self.extract(response)
            if answer is None:
                grades[i] = Grade(False, False, None)
                continue
            quick = quick_match(answer, golds)
            if quick is not None:
                grades[i] = Grade(quick, True, answer)
                continue
            jobs.append((answer, golds, self._alarm_s))
            where.append(i)
        verdicts = self._run(self._verify_ref, jobs, False, keys=[j[1] for j in jobs]) if jobs else []
        job_latency = self.last_latency_s if jobs else []
        latency = [0.0] * len(pairs)
        for k, i in enumerate(where):
            grades[i] = Grade(bool(verdicts[k]), True, jobs[k][0])
            latency[i] = job_latency[k]
        self.last_latency_s = latency
        return grades  # type: ignore[return-value]


def _as_grade(x: Any) -> Grade:
    if isinstance(x, Grade):
        return x
    if isinstance(x, bool):
        return Grade(x, True, None)
    return Grade(False, True, None)
