"""Launch real SGLang for production runs, from the `rollout` config section.

    python -m sglang.launch_server --model-path DIR --tp-size N --mem-fraction-static F
        [--enable-memory-saver] --skip-server-warmup --host H --port P [--api-key K]
        --random-seed S --dtype bfloat16

Flags and request fields follow SGLang 0.5.x (`python/sglang/srt/server_args.py`,
`python/sglang/srt/entrypoints/http_server.py`, `python/sglang/srt/managers/io_struct.py`).
SGLang is never a dependency of the CPU install: this module only builds the command and
runs it; the client and weight sync are the same code that talks to our own server.

Weight sync with SGLang (`transport_name`): colocated, CUDA IPC handles through
`/update_weights_from_tensor` (`transports/cuda_ipc.py`); on GPUs of its own, an NCCL
broadcast (`transports/nccl.py`). `SGLang` is the backend adapter the registry holds.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..process import ManagedServer
from ..transports import WeightTransport
from .base import RolloutBackend
from .base import get as _get

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The releases the client is checked against (tests/test_sglang_contract.py reads each one's
# source from its wheel); setup.py's `sglang` extra pins the same range.
SUPPORTED_VERSIONS = ("0.5.15.post1", "0.5.16", "0.5.17", "0.5.18", "0.5.19", "0.5.20", "0.5.21", "0.5.22",
                      "0.5.23")


def check_rollout_config(rollout: Any) -> None:
    """What SGLang cannot do with this config, as errors naming the config key."""
    from ..placement import check_sync

    check_sync({**{k: _get(rollout, k) for k in ("sync_method", "colocate", "tp_size")}, "backend": "sglang"})
    if _get(rollout, "tp_size", 1) < 1:
        raise ValueError(f"rollout.tp_size must be >= 1, got {_get(rollout, 'tp_size')}")
    if not 0 < float(_get(rollout, "mem_fraction", 0.6)) < 1:
        raise ValueError(f"rollout.mem_fraction must be in (0, 1), got {_get(rollout, 'mem_fraction')}")
    host = _get(rollout, "host", "127.0.0.1")
    if host not in LOOPBACK and not _get(rollout, "api_key"):
        raise ValueError(f"rollout.api_key is required when rollout.host is {host!r} (not loopback): anyone who "
                         "can reach the server could replace the model's weights")


def sglang_command(rollout: Any, model_path: str | Path, port: int, *, seed: int = 0, dtype: str = "bfloat16",
                   dp_size: int = 1, python: str = sys.executable, extra_args: Sequence[str] = (),
                   base_gpu_id: Optional[int] = None) -> list[str]:
    """The `sglang.launch_server` command line for the `rollout` config section; the engine's
    first GPU is `base_gpu_id`, else `placement.launch_base_gpu` (explicit, never SGLang's default)."""
    from ..placement import launch_base_gpu

    cmd = [python, "-m", "sglang.launch_server",
           "--model-path", str(model_path),
           "--tp-size", str(int(_get(rollout, "tp_size", 1))),
           "--mem-fraction-static", str(float(_get(rollout, "mem_fraction", 0.6))),
           "--host", str(_get(rollout, "host", "127.0.0.1")),
           "--port", str(int(port)),
           "--random-seed", str(int(seed)),
           "--dtype", dtype,
           "--skip-server-warmup",
           "--base-gpu-id", str(launch_base_gpu(rollout) if base_gpu_id is None else int(base_gpu_id))]
    if dp_size > 1:
        cmd += ["--dp-size", str(int(dp_size))]
    if _get(rollout, "colocate", False):
        cmd.append("--enable-memory-saver")  # needed by /release_memory_occupation
    if _get(rollout, "api_key"):
        cmd += ["--api-key", str(_get(rollout, "api_key"))]
    return cmd + list(extra_args)


class SGLangServer(ManagedServer):
    """An SGLang server process managed like our own (`LocalServer`)."""

    name = "sglang"

    def __init__(self, rollout: Any, model_path: str | Path, *, seed: int = 0, dtype: str = "bfloat16",
                 dp_size: int = 1, log_file: Optional[str | Path] = None, extra_args: Sequence[str] = (),
                 env: Optional[dict] = None, python: str = sys.executable):
        check_rollout_config(rollout)
        super().__init__(host=_get(rollout, "host", "127.0.0.1"), port=int(_get(rollout, "port", 0)),
                         api_key=_get(rollout, "api_key"), log_file=log_file,
                         startup_timeout_s=float(_get(rollout, "startup_timeout_s", 300.0)), env=env)
        self.rollout = rollout
        self.model_path = str(model_path)
        self.seed, self.dtype, self.dp_size = seed, dtype, dp_size
        self.extra_args = list(extra_args)
        self.python = python

    def command(self) -> list[str]:
        return sglang_command(self.rollout, self.model_path, self.port, seed=self.seed, dtype=self.dtype,
                              dp_size=self.dp_size, python=self.python, extra_args=self.extra_args)

    def client(self, **kwargs):
        kwargs.setdefault("timeout_s", float(_get(self.rollout, "request_timeout_s", 600.0)))
        kwargs.setdefault("retries", int(_get(self.rollout, "retries", 3)))
        return super().client(**kwargs)

    def start(self, sync=None) -> "SGLangServer":
        """Spawn, wait for /health_generate, then (given a WeightSync) join its NCCL weight-update group."""
        super().start()
        if sync is not None:
            sync.connect()
        return self


class SGLang(RolloutBackend):
    """Real SGLang (`python -m sglang.launch_server`), launched or at `rollout.urls`."""

    name = "sglang"
    description = "SGLang"
    continuous_batching = True
    seeds_samples_alike = True  # it hashes one seed with positions: n samples of a prompt may coincide
    group_backend = "nccl"

    def check_config(self, rollout: Any) -> None:
        check_rollout_config(rollout)

    def transport_name(self, rollout: Any) -> str:
        super().transport_name(rollout)  # a known rollout.sync_method
        method, colocate = _get(rollout, "sync_method", "tensor"), bool(_get(rollout, "colocate", False))
        if colocate and method == "distributed":
            raise ValueError("rollout.colocate=true with rollout.sync_method=distributed cannot work: the engine "
                             "shares the trainer's GPUs and NCCL refuses a group holding the same GPU twice; "
                             "colocated SGLang takes rollout.sync_method=tensor (CUDA IPC handles)")
        if not colocate and method == "tensor":
            raise ValueError("rollout.sync_method=tensor with rollout.backend=sglang needs rollout.colocate=true: its "
                             "tensor path takes CUDA IPC handles to the trainer's GPUs; engines on GPUs of their own "
                             "take rollout.sync_method=distributed (NCCL)")
        return "cuda_ipc" if colocate else "nccl_broadcast"

    def server(self, rollout: Any, model_path, *, seed: int = 0, log_file=None, threads=None) -> SGLangServer:
        return SGLangServer(rollout, model_path, seed=seed, log_file=log_file)

    def launch_command(self, rollout: Any, model_path, port: int, *, seed: int = 0, dtype: str = "bfloat16",
                       base_gpu_id: Optional[int] = None, python: str = sys.executable) -> list[str]:
        return sglang_command(rollout, model_path, port, seed=seed, dtype=dtype, base_gpu_id=base_gpu_id,
                              python=python)

    def transport(self, rollout: Any, engines: int, dp_size: int = 1) -> WeightTransport:
        """As the base; an NCCL broadcast is refused for data-parallel engines."""
        if dp_size > 1 and self.transport_name(rollout) == "nccl_broadcast":
            # tokenizer_control_mixin.py asserts dp_size == 1 for update_weights_from_distributed
            raise ValueError(f"dp_size={dp_size}: SGLang's update_weights_from_distributed takes no data-"
                             "parallel replicas; launch one engine per replica (rollout.urls)")
        return super().transport(rollout, engines)
