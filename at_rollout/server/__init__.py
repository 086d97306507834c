"""The project's rollout server (SGLang's HTTP API over an in-process generator).

    python -m at_rollout.server --model-path DIR --host 127.0.0.1 --port N

`cli.py` the command line (checks its arguments before importing torch), `app.py` the
FastAPI application, `models.py` the strict request models, `generator.py` batched sampling
with a KV cache, `scheduler.py` the generation thread, `weights.py` the served weights. The
trainer side never imports this package: it talks HTTP through `at_rollout.client`.
"""
from .cli import main

__all__ = ["main"]
