import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 model directory with the R1-style tokenizer."""
    from at_core.tiny import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_model"), size="test")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Our rollout server as a real process on loopback, one per test module; a weight update
    left open times out in 20 s. Modules that need other flags define their own."""
    from at_rollout.backends.own_server import LocalServer

    srv = LocalServer(tiny_model_dir, log_file=tmp_path_factory.mktemp("server") / "server.log",
                      extra_args=["--weight-update-timeout-s", "20"])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def model(tiny_model_dir):
    """The tiny model as a plain fp32 HF model (the trainer-side copy in weight-sync tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
