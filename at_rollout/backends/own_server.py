"""The project's own rollout server as a backend: `python -m at_rollout.server`, on every machine.

It speaks SGLang's HTTP API (docs/rollout.md), takes the HTTP tensor body or a gloo/NCCL
broadcast for weights, and runs each merged request to its longest row (no continuous
batching), so the dispatcher gives it an engine's whole share per request.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..client import RolloutError
from ..process import ManagedServer
from .base import RolloutBackend, get


class OwnServer(RolloutBackend):
    name = "server"
    description = "The project's own server"

    launches_engines = True

    def server(self, rollout: Any, model_path, *, seed: int = 0, log_file=None,
               threads: Optional[int] = None) -> "LocalServer":
        # Both names: torch takes MKL_NUM_THREADS over OMP_NUM_THREADS when both are set.
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(int(threads)),
                                            "MKL_NUM_THREADS": str(int(threads))}
        return LocalServer(model_path, host=get(rollout, "host", "127.0.0.1"), port=int(get(rollout, "port", 0)),
                           api_key=get(rollout, "api_key"), log_file=log_file,
                           startup_timeout_s=float(get(rollout, "startup_timeout_s", 300.0)), env=env)

    def launch_command(self, rollout: Any, model_path, port: int, *, seed: int = 0, dtype: str = "bfloat16",
                       base_gpu_id: Optional[int] = None, python: str = sys.executable) -> list[str]:
        key = get(rollout, "api_key")
        return server_command(python, model_path, get(rollout, "host", "127.0.0.1"), port) + [
            "--random-seed", str(int(seed))] + (["--api-key", str(key)] if key else [])


def server_command(python: str, model_path, host: str, port: int) -> list[str]:
    """The DESIGN contract: `python -m at_rollout.server --model-path DIR --host H --port N`."""
    return [python, "-m", "at_rollout.server", "--model-path", str(model_path), "--host", str(host),
            "--port", str(int(port))]


class LocalServer(ManagedServer):
    """The project's own server: `python -m at_rollout.server`."""

    name = "at_rollout.server"

    def __init__(self, model_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 extra_args: Sequence[str] = (), log_file: Optional[str | Path] = None, api_key: Optional[str] = None,
                 startup_timeout_s: float = 300.0, env: Optional[dict] = None, python: str = sys.executable):
        super().__init__(host, port, api_key, log_file, startup_timeout_s, env)
        self.model_path = str(model_path)
        self.extra_args = list(extra_args)
        self.python = python
        self._port_file: Optional[Path] = None

    def _resolve_port(self):
        # Port 0: the server binds a free port itself and writes it to a file (no race). A restart
        # asks for the same port again so the trainer's URL stays valid.
        self._port_file = Path(tempfile.mkdtemp(prefix="at_rollout_port_")) / "port"

    def child_env(self) -> dict:
        env = super().child_env()
        if self.api_key:
            env["AT_ROLLOUT_API_KEY"] = self.api_key  # not on the command line, where `ps` shows it
        return env

    def command(self) -> list[str]:
        return server_command(self.python, self.model_path, self.host, self.port) + ["--port-file", str(self._port_file), "--parent-pid", str(os.getpid())] + self.extra_args

    def _after_spawn(self, deadline: float):
        while time.monotonic() < deadline:
            if self._port_file.is_file():
                self.port = int(self._port_file.read_text())
                shutil.rmtree(self._port_file.parent, ignore_errors=True)
                return
            if self.proc.poll() is not None:
                raise RolloutError(f"server process exited with code {self.proc.returncode}")
            time.sleep(0.1)
        raise RolloutError("server did not bind a port in time")
