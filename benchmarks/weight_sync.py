"""Weight sync speed against the transport it runs on, for a random 100M-500M Qwen2 model on CPU.

    python benchmarks/weight_sync.py [--hidden 768 --layers 12 --vocab 32000] [--bucket-mb 256]

For each method, the full sync (pause, flush, every bucket, continue; the server validates
and applies every tensor) is timed beside the bare transport of the same bytes:

- tensor, both bodies the server takes: the safetensors blob as the raw body (what weight
  sync uses with our server) and base64 inside SGLang's JSON body; beside one HTTP POST
  carrying the model's raw bytes to a uvicorn endpoint that reads and drops them (same
  HTTP stack, no base64, no parsing, no copy into a model);
- distributed: one gloo broadcast of one flat tensor of the model's size, between this
  process and a bare torch process (same backend, same loopback).

Target: sync / transport <= 2. Prints a table: medians of `--repeats` interleaved rounds.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model_dir(out: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from at_core.tiny import SAMPLE_CORPUS
    from at_core.tiny.model import save_model
    from at_core.tiny.tokenizer import build_tokenizer

    build_tokenizer(out, SAMPLE_CORPUS * 20, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(out)
    heads = max(1, hidden // 64)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    save_model(model, tok, out)
    return out, sum(p.numel() for p in model.parameters())


try:  # at module level: FastAPI resolves the handler's (string) annotation in these globals
    from starlette.requests import Request as _Request
except ImportError:  # pragma: no cover
    _Request = None


def discard_server(port_file: str) -> None:
    """A uvicorn app whose one endpoint reads the whole body and drops it (the HTTP baseline)."""
    import socket

    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/discard")
    async def discard(request: _Request):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def gloo_receiver(port: int, numel: int, repeats: int) -> None:
    """Rank 1 of a bare gloo pair: receive `repeats` broadcasts of a flat fp32 tensor."""
    import torch

    from at_rollout.dist_group import create_group

    group = create_group("gloo", "127.0.0.1", port, 1, 2, "bench", 120)
    buf = torch.empty(numel)
    for _ in range(repeats + 1):
        torch.distributed.broadcast(buf, src=0, group=group)
    torch.distributed.destroy_process_group(group)


def _wait_file(path: Path, proc, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError("helper process died")
        time.sleep(0.1)
    raise TimeoutError(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (here and in the server); 1 avoids oversubscribing a busy box")
    ap.add_argument("--discard-server", help=argparse.SUPPRESS)
    ap.add_argument("--gloo-receiver", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.discard_server:
        return discard_server(args.discard_server)
    if args.gloo_receiver:
        return gloo_receiver(*args.gloo_receiver)

    import os

    import requests
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server and helper processes

    from at_rollout.dist_group import create_group, free_port
    from at_rollout.backends.own_server import LocalServer
    from at_rollout.weight_sync import WeightSync

    tmp = Path(tempfile.mkdtemp(prefix="bench_ws_"))
    model_dir, n_params = build_model_dir(tmp / "model", args.hidden, args.layers, args.vocab)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {n_params / 1e6:.0f}M parameters, {nbytes / 2**20:.0f} MiB fp32; bucket {args.bucket_mb} MB; "
          f"median of {args.repeats}; {args.threads} torch thread(s) per process", flush=True)
    with LocalServer(model_dir, log_file=tmp / "server.log") as server:
        client = server.client(timeout_s=600)
        port_file = tmp / "discard.port"
        http_helper = subprocess.Popen([sys.executable, __file__, "--discard-server", str(port_file)])
        gloo_port = free_port()
        gloo_helper = subprocess.Popen([sys.executable, __file__, "--gloo-receiver", str(gloo_port),
                                        str(nbytes // 4), str(args.repeats)])
        try:
            url = f"http://127.0.0.1:{_wait_file(port_file, http_helper)}/discard"
            while True:
                try:
                    requests.post(url, data=b"x", timeout=5)
                    break
                except requests.ConnectionError:
                    time.sleep(0.2)
            payload = bytes(nbytes)
            flat = torch.randn(nbytes // 4)
            group = create_group("gloo", "127.0.0.1", gloo_port, 0, 2, "bench", 120)
            binary = WeightSync(client, "tensor", args.bucket_mb, tensor_body="binary")
            json_body = WeightSync(client, "tensor", args.bucket_mb, tensor_body="json")
            dist_sync = WeightSync(client, "distributed", args.bucket_mb, timeout_s=600)
            dist_sync.connect()

            def post_raw():
                assert requests.post(url, data=payload, timeout=600).json()["bytes"] == nbytes

            def broadcast_flat():
                torch.distributed.broadcast(flat, src=0, group=group)

            cases = {"binary": lambda: binary.sync(model), "json": lambda: json_body.sync(model),
                     "http": post_raw, "dist": lambda: dist_sync.sync(model), "gloo": broadcast_flat}
            times = {k: [] for k in cases}
            # Interleaved rounds (first one a warm-up): the machine's speed drifts, and each
            # ratio compares runs taken side by side.
            for round_ in range(args.repeats + 1):
                for name, fn in cases.items():
                    t = time.perf_counter()
                    fn()
                    if round_:
                        times[name].append(time.perf_counter() - t)
            dist_sync.close()
            torch.distributed.destroy_process_group(group)
            gloo_helper.wait(120)
        finally:
            http_helper.kill()
            gloo_helper.kill()
    for k, v in times.items():
        print(f"{k:>7}: " + " ".join(f"{x:.2f}" for x in v))
    t = {k: statistics.median(v) for k, v in times.items()}
    rows = [("tensor, raw safetensors body (used with our server)", t["binary"], "one HTTP POST of the raw bytes",
             t["http"]),
            ("tensor, base64 in SGLang's JSON body", t["json"], "one HTTP POST of the raw bytes", t["http"]),
            ("distributed (gloo broadcast per tensor)", t["dist"], "one flat gloo broadcast", t["gloo"])]
    print("\n| method | sync s | GB/s | baseline | baseline s | sync / baseline |")
    print("|---|---|---|---|---|---|")
    for name, ts, base, tb in rows:
        print(f"| {name} | {ts:.2f} | {nbytes / ts / 1e9:.2f} | {base} | {tb:.2f} | {ts / tb:.2f} |")


if __name__ == "__main__":
    main()
