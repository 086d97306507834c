"""Start, watch, restart and stop a rollout server process (each backend's `ManagedServer`).

The server runs in its own process group with its output in a log file; a failed start
raises with the tail of that log. Servers are stopped at interpreter exit, and our own
server also exits by itself when the process that started it is gone.

The child gets the launcher's environment without the launcher's own variables: under
torchrun or the DeepSpeed launcher those (RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_USE_AGENT_STORE, ...) would change how SGLang's own process groups rendezvous.
Readiness is /health_generate (a generated token), not /health.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional, Sequence

from .client import RolloutClient, RolloutError
from .dist_group import free_port

_LIVE: "weakref.WeakSet[ManagedServer]" = weakref.WeakSet()

# Set by torchrun / torchelastic, the DeepSpeed launcher and this project: never the child's.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                 "CROSS_SIZE", "LOCAL_SIZE", "NODE_RANK", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "DS_ACCELERATOR")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_", "DEEPSPEED_", "DS_", "PDSH_", "AT_")


def child_env(base: Optional[dict] = None, keep: Sequence[str] = ()) -> dict:
    """`base` (default: this process's environment) without the launcher's variables; names
    in `keep` stay."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name in keep:
            continue
        if name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES):
            del env[name]
    return env


def _stop_all():
    for server in list(_LIVE):
        server.stop()


atexit.register(_stop_all)


def log_tail(path: Optional[Path], lines: int = 40) -> str:
    if path is None or not Path(path).is_file():
        return "(no log)"
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class ManagedServer:
    """A server process speaking the rollout HTTP API; subclasses say how to launch it."""

    name = "server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: Optional[str] = None,
                 log_file: Optional[str | Path] = None, startup_timeout_s: float = 300.0,
                 env: Optional[dict] = None):
        self.host = host
        self.port = int(port)
        self.api_key = api_key
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.log_file = Path(log_file) if log_file else None
        self.proc: Optional[subprocess.Popen] = None
        self._fixed_port = self.port != 0

    # subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def _resolve_port(self):
        if self.port == 0:
            self.port = free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")

    def _after_spawn(self, deadline: float):
        """Hook between spawning and the health wait (our server reports its port here)."""

    def child_env(self) -> dict:
        """The server process's environment: `env` (default ours) less the launcher's variables."""
        return child_env(self.env)

    # common
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}"

    def client(self, **kwargs) -> RolloutClient:
        return RolloutClient(self.url, api_key=self.api_key, **kwargs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ManagedServer":
        if self.alive():
            return self
        if self.log_file is None:
            fd, path = tempfile.mkstemp(prefix=f"at_rollout_{self.name}_", suffix=".log")
            os.close(fd)
            self.log_file = Path(path)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._resolve_port()
        env = self.child_env()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        _LIVE.add(self)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            self._after_spawn(deadline)
            self.client(retries=0).wait_for_health(max(1.0, deadline - time.monotonic()), process=self.proc)
        except RolloutError as err:
            self.stop()
            raise RolloutError(f"{self.name} at {self.url} failed to start: {err}\n--- last lines of "
                               f"{self.log_file} ---\n{log_tail(self.log_file)}") from None
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def restart(self) -> "ManagedServer":
        """Stop (if running) and start again on the same port; weights are the model directory's."""
        self.stop()
        try:
            return self.start()
        except RolloutError:
            if self._fixed_port:
                raise
            self.port = 0  # our old port was taken meanwhile: take any free one
            return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
