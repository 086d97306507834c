"""The project's rollout server: SGLang's HTTP API over the in-process `Generator`.

    python -m at_rollout.server --model-path DIR [--host 127.0.0.1] [--port 30000] [--api-key K]

It exists so that machines without SGLang (CPU, CI, laptops) run the trainer's real client
and weight-sync code against a real server. Safe by default: it binds loopback, refuses
any other address without `--api-key`, checks `Authorization: Bearer <key>` on every
endpoint but the health checks when a key is set, limits request sizes, answers bad
requests with a 4xx JSON error naming the field, and never unpickles anything.

This module is the command line only; it checks its arguments before importing torch,
so a mistake is reported in a blink. The application is `app.py`.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("at_rollout.server")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MB = 1 << 20


# ---------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="at_rollout.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="HF model directory (config, safetensors, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    ap.add_argument("--port", type=int, default=30000, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--api-key", default=os.environ.get("AT_ROLLOUT_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (env AT_ROLLOUT_API_KEY)")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--random-seed", type=int, default=None, help="seeds requests that give no sampling_seed")
    ap.add_argument("--max-running-requests", type=int, default=1024, help="rows decoded together at most")
    ap.add_argument("--max-request-mb", type=float, default=64, help="body limit of /generate and small endpoints")
    ap.add_argument("--max-weights-request-mb", type=float, default=16384, help="body limit of weight updates")
    ap.add_argument("--weight-update-timeout-s", type=float, default=300.0,
                    help="rendezvous and broadcast timeout of the weight update group")
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    ap.add_argument("--log-level", default="info")
    return ap


def _watch_parent(pid: int):
    def loop():
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.warning("parent process %d is gone; exiting", pid)
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's bound socket. Made with proto IPPROTO_TCP, not 0: asyncio turns Nagle off
    (TCP_NODELAY) only on accepted sockets that say they are TCP, and with Nagle on, every
    response with a body waited ~40 ms for the client's delayed ACK (each control call of a
    weight sync, each /generate)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.enable()  # a crash in native code leaves a Python stack in the log
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.host not in LOOPBACK and not args.api_key:
        print(f"error: refusing to bind {args.host!r} without --api-key: anyone who can reach it could replace "
              "the model's weights. Pass --api-key (or AT_ROLLOUT_API_KEY), or bind 127.0.0.1.", file=sys.stderr)
        return 2
    if not Path(args.model_path, "config.json").is_file():
        print(f"error: --model-path {args.model_path!r} has no config.json", file=sys.stderr)
        return 2
    if args.parent_pid:
        _watch_parent(args.parent_pid)

    import uvicorn

    from .app import ServerState, create_app
    from .generator import Generator

    generator = Generator.from_pretrained(args.model_path, dtype=args.dtype, device=args.device,
                                          attn_implementation=args.attn_implementation,
                                          max_batch_rows=args.max_running_requests, seed=args.random_seed)
    state = ServerState(generator, model_path=args.model_path, api_key=args.api_key,
                        max_request_bytes=int(args.max_request_mb * MB),
                        max_weights_request_bytes=int(args.max_weights_request_mb * MB),
                        weight_update_timeout_s=args.weight_update_timeout_s)
    app = create_app(state)
    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    import torch

    log.info("serving %s on http://%s:%d (%s, %d torch threads)", args.model_path, args.host, port,
             generator.device, torch.get_num_threads())
    config = uvicorn.Config(app, log_level=args.log_level.lower() if args.log_level.lower() != "info" else "warning",
                            timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
    return 0

