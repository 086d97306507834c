"""The processes grading runs in: a zygote that imports math-verify once and forks
workers, and the worker loop. Both run in a fresh interpreter started by
`at_reward.pool.GradingPool` (see its module note for why not multiprocessing).
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import pickle
import resource
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional, Sequence

from at_reward.math import verify_answer


@dataclass(frozen=True)
class FnRef:
    """A module-level function named so a worker can import it: by module, else by file."""

    module: str
    qualname: str
    file: Optional[str] = None

    @classmethod
    def of(cls, fn: Callable) -> "FnRef":
        if "<locals>" in fn.__qualname__ or fn.__qualname__ == "<lambda>":
            raise ValueError(f"grader {fn.__qualname__} must be a module-level function")
        mod = sys.modules.get(fn.__module__)
        return cls(fn.__module__, fn.__qualname__, getattr(mod, "__file__", None))

    def resolve(self) -> Callable:
        mod = sys.modules.get(self.module) if self.module != "__main__" else None
        if mod is None:
            try:
                if self.module == "__main__":
                    raise ImportError("__main__ of the parent is not importable by name")
                mod = importlib.import_module(self.module)
            except ImportError:
                if not self.file:
                    raise
                name = "_at_reward_main" if self.module == "__main__" else self.module
                spec = importlib.util.spec_from_file_location(name, self.file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def quiet_logs() -> None:
    # math-verify logs the whole input on every timeout: 50 kB of junk per bad answer.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def serve_worker(fd: int, memory_limit_mb: int) -> None:
    """Serve (FnRef, args) requests on `fd` until EOF; every outcome is a reply."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the zygote
    except (OSError, AttributeError):
        pass
    if memory_limit_mb > 0:  # runaway sympy arithmetic fails with MemoryError, not the OOM killer
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_limit_mb << 20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ValueError, OSError):
            pass
    conn = Connection(fd)
    cache: dict[FnRef, Callable] = {}
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            ref, args = pickle.loads(raw)
        except BaseException as err:  # noqa: BLE001 - any failure is a reply, never a death
            conn.send(("error", f"bad request: {type(err).__name__}"))
            continue
        try:
            fn = cache.get(ref) or cache.setdefault(ref, ref.resolve())
        except BaseException as err:  # noqa: BLE001
            conn.send(("unresolved", f"{ref.module}.{ref.qualname}: {type(err).__name__}: {err}"[:500]))
            continue
        try:
            reply = ("ok", fn(*args))
        except BaseException as err:  # noqa: BLE001 - includes math-verify's TimeoutException
            reply = ("error", f"{type(err).__name__}: {err}"[:300])
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send(("error", f"result not sendable: {type(err).__name__}"))


def zygote_main(ctrl_fd: int, memory_limit_mb: int, preload: Sequence[str], grader: Optional[tuple]) -> None:
    """Import and warm up once, then fork a worker per request (see the module note)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_logs()
    for name in preload:
        importlib.import_module(name)
    if grader is None:
        verify_answer("\\frac{1}{2}", ("0.5",))  # compiles math-verify's regexes and grammar
    else:
        try:  # import the grader's module once here rather than in every worker
            FnRef(*grader).resolve()
        except Exception:  # noqa: BLE001 - the worker reports it, with the error, per request
            pass
    ctrl = socket.socket(fileno=ctrl_fd)
    try:
        ctrl.sendall(b"R")
    except OSError:  # the parent is gone already (a run that ended during our warm-up): leave quietly
        os._exit(0)
    unreaped: set[int] = set()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 64, 1)
        except (OSError, ValueError):
            break
        if not msg:
            for fd in fds:
                os.close(fd)
            break
        if msg[:1] == b"F" and fds:
            pid = os.fork()
            if pid == 0:
                ctrl.close()
                try:
                    serve_worker(fds[0], memory_limit_mb)
                finally:
                    os._exit(0)
            os.close(fds[0])
            try:
                ctrl.sendall(struct.pack("!q", pid))
            except OSError:  # the parent is gone
                break
        elif msg[:1] == b"W":
            unreaped.add(struct.unpack("!q", msg[1:9])[0])
        for pid in list(unreaped):  # reap only what the parent has finished with
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    unreaped.discard(pid)
            except ChildProcessError:
                unreaped.discard(pid)
    os._exit(0)  # workers die with us (PR_SET_PDEATHSIG)
