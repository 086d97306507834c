"""One generation thread: merges requests that arrive together into one batched call.

The HTTP handlers only validate and enqueue; this thread owns the model while it
generates (`model_lock`), so a weight update waits for the running batch, or, while
generation is paused in place, slips in between two decode steps, as in SGLang.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

from .generator import Generator, GeneratedSample, SamplingParams

log = logging.getLogger("at_rollout.scheduler")


@dataclass(eq=False)  # hashed by identity (kept in a set)
class Job:
    prompts: list[list[int]]
    params: list[SamplingParams]
    future: Future = field(default_factory=Future)


def aborted_samples(job: Job, message: str) -> list[GeneratedSample]:
    return [GeneratedSample(output_ids=[], logprobs=[], finish_reason={"type": "abort", "message": message},
                   prompt_tokens=len(p), text="", prompt_index=i, sample_index=j)
            for i, (p, sp) in enumerate(zip(job.prompts, job.params)) for j in range(sp.n)]


class Scheduler:
    def __init__(self, generator: Generator, batch_window_s: float = 0.002):
        self.generator = generator
        self.batch_window_s = batch_window_s
        self.model_lock = threading.Lock()
        self._queue: "queue.Queue[Job]" = queue.Queue()
        self._resume = threading.Event()
        self._resume.set()
        self._pause_mode: Optional[str] = None
        self._abort = False
        self._pending = 0  # jobs submitted and not answered yet
        self._waiting: set = set()  # jobs submitted and not started yet
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._resume.set()

    # ---------------------------------------------------------------- control
    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Future:
        job = Job(prompts, params)
        with self._count_lock:
            self._pending += 1
            self._waiting.add(job)
        job.future.add_done_callback(self._answered)
        self._queue.put(job)
        return job.future

    def _answered(self, _future):
        with self._count_lock:
            self._pending -= 1

    @property
    def busy(self) -> bool:
        return self._pending > 0

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def pause(self, mode: str = "abort"):
        """abort: end running and waiting requests now; retract/in_place: hold them until resumed.
        Requests that arrive while paused wait for `resume` (as in SGLang)."""
        self._pause_mode = mode
        self._resume.clear()
        if mode == "abort":
            self._abort = True
            with self._count_lock:
                waiting, self._waiting = list(self._waiting), set()
            for job in waiting:
                if not job.future.done():
                    job.future.set_result(aborted_samples(job, "aborted by pause_generation"))

    def resume(self):
        self._abort = False
        self._pause_mode = None
        self._resume.set()

    # ---------------------------------------------------------------- the thread
    def _checkpoint(self) -> bool:
        """Called by the generator between decode steps."""
        if self._abort:
            return True
        if not self._resume.is_set():
            self.model_lock.release()  # let weight updates in while paused in place
            try:
                self._resume.wait()
            finally:
                self.model_lock.acquire()
            return self._abort
        return False

    def _loop(self):
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._resume.wait()
            if self._stop.is_set():
                break
            time.sleep(self.batch_window_s)  # let requests sent together arrive together
            jobs = [first]
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._count_lock:
                jobs = [j for j in jobs if not j.future.done()]  # an abort-pause may have answered some
                self._waiting.difference_update(jobs)
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]):
        prompts, params, keys = [], [], []
        for job in jobs:
            prompts += job.prompts
            params += job.params
            keys += list(range(len(job.prompts)))
        try:
            with self.model_lock:
                samples = self.generator.generate(prompts, params, seed_keys=keys, should_abort=self._checkpoint)
        except Exception as err:  # a bad batch must not kill the thread
            log.exception("generation failed")
            for job in jobs:
                job.future.set_exception(err)
            return
        start = 0
        for job in jobs:
            count = sum(p.n for p in job.params)
            job.future.set_result(samples[start:start + count])
            start += count
