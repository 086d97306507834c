"""The colocated weight-sync payload against SGLang's own code, from the real wheels.

On CPU the handles are shared-memory file names where CUDA IPC handles would be; the bucket,
the pickle, the base64, the per-TP-rank entries and the request are the same code as on GPU.
"""
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from at_rollout.transports import cuda_ipc
from helpers import ROOT, free_port
from sglang_side import SUPPORTED, wheel_source

CACHE = Path(os.environ.get("AT_SGLANG_WHEEL_CACHE", Path.home() / ".cache/autothink/sglang-wheels"))


def wheel(version: str) -> str:
    """The `sglang` wheel of `version`, downloaded once into the cache (skip when unreachable)."""
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"sglang=={version}", "-d",
                               str(CACHE)], capture_output=True, text=True, timeout=600)
        found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
        if not found:
            pytest.skip(f"the sglang {version} wheel could not be downloaded: {proc.stderr.strip()[-300:]}")
    return str(found[0])


def bucket():
    torch.manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(11, 8).to(torch.bfloat16)),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8).to(torch.bfloat16)),
            ("model.norm.weight", torch.ones(8, dtype=torch.bfloat16))]


@pytest.mark.parametrize("version", SUPPORTED)
def test_sglang_decodes_the_payload_in_another_process(version, tmp_path):
    named = bucket()
    flat, meta = cuda_ipc.flatten(named)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * 2 for _, t in named)
    copies = [flat, flat.clone(), flat.clone(), flat.clone()]  # two TP ranks' copies for each decoder, kept alive
    entries = [cuda_ipc.serialize(c, meta) for c in copies]
    spec = tmp_path / "entries.json"
    spec.write_text(json.dumps({"sglang": entries[:2], "ours": entries[2:], "load_format": cuda_ipc.LOAD_FORMAT}))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/sglang_side.py"), "decode", wheel(version), str(spec),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    from sglang_side import digest

    want = digest(named)
    assert got["sglang"] == [want, want]  # SGLang's SafeUnpickler + FlattenedTensorBucket, bit for bit
    assert got["ours"] == [want, want]  # our rewrite of SGLang's side (used by the GPU check) agrees


def _fields(src: str, cls: str) -> list[str]:
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ClassDef) and n.name == cls)
    return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]


@pytest.mark.parametrize("version", SUPPORTED)
def test_payload_format_matches_the_wheels_source(version):
    w = wheel(version)
    bucket_src = wheel_source(w, "sglang/srt/weight_sync/tensor_bucket.py")
    ours = [f.name for f in cuda_ipc.FlattenedTensorMetadata.__dataclass_fields__.values()]
    assert _fields(bucket_src, "FlattenedTensorMetadata") == ours, f"sglang {version}: FlattenedTensorMetadata"
    req = _fields(wheel_source(w, "sglang/srt/managers/io_struct.py"), "UpdateWeightsFromTensorReqInput")
    for key in cuda_ipc.request_body(["x"], weight_version="1"):
        assert key in req, f"sglang {version}: UpdateWeightsFromTensorReqInput has no field {key!r}"
    updater = next(p for p in ("sglang/srt/model_executor/model_runner_components/weight_updater.py",
                               "sglang/srt/model_executor/model_runner.py") if _has(w, p))
    src = wheel_source(w, updater)
    consumer = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)
                    and n.name == "_update_weights_from_flattened_bucket")
    keys = {n.slice.value for n in ast.walk(consumer) if isinstance(n, ast.Subscript)
            and isinstance(n.slice, ast.Constant)}
    assert keys == {"flattened_tensor", "metadata"}, f"sglang {version}: the bucket dict's keys"
    assert f'load_format == "{cuda_ipc.LOAD_FORMAT}"' in src
    # SGLang's unpickler lets through every global a payload of ours can name
    common = wheel_source(w, "sglang/srt/utils/common.py")
    safe = next(n for n in ast.parse(common).body if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    sets = {t.targets[0].id: ast.literal_eval(t.value) for t in safe.body if isinstance(t, ast.Assign)}
    for module, name in cuda_ipc.DECODE_GLOBALS:
        if "ALLOWED_GLOBALS" in sets:
            ok = (module, name) in sets["ALLOWED_GLOBALS"]
        else:
            ok = (module, name) not in sets.get("DENY_CLASSES", set()) and any(
                (module + ".").startswith(p) for p in sets["ALLOWED_MODULE_PREFIXES"])
        assert ok, f"sglang {version}: SafeUnpickler refuses {module}.{name}"


def _has(w, path):
    import zipfile

    with zipfile.ZipFile(w) as zf:
        return path in zf.namelist()


def test_the_decoder_refuses_other_globals():
    import base64
    import pickle

    evil = base64.b64encode(pickle.dumps(os.system)).decode()
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        cuda_ipc.decode(evil)
    with pytest.raises(ValueError, match="empty bucket"):
        cuda_ipc.flatten([])


@pytest.fixture(params=["0.5.23", "0.5.15.post1"])
def standin(request, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/sglang_side.py"), "serve", wheel(request.param),
                             request.param, str(port_file)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port_file.read_text()}"
    proc.kill()
    proc.wait()


@pytest.mark.timeout(240)
def test_two_ranks_sync_into_a_tp2_engine_through_the_payload(standin, tmp_path):
    out, log = tmp_path / "result.json", tmp_path / "torchrun.log"
    # Output to a file, not a pipe: torch's shared-memory manager (file_system sharing) outlives
    # the ranks while the stand-in holds its files, and would keep a pipe open.
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(ROOT / "tests/dist/cuda_ipc_sync.py"), standin,
                               str(out)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=200,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, log.read_text()[-5000:]
    r = json.loads(out.read_text())
    import requests

    served = requests.get(f"{standin}/standin/weights", timeout=10).json()
    assert r["buckets"] > 1 and r["tensors"] == len(r["expected"]) == 4
    assert served["weights"] == r["expected"]  # decoded by SGLang's code, cast alike on both ranks
    assert served["entries"] == 2 * r["buckets"]  # one entry per TP rank in every request
    assert served["weight_version"] == "7"
    assert all("no trainer rank runs on GPU(s) [2]" in b for b in r["bad_per_rank"]), r["bad_per_rank"]


@pytest.mark.timeout(120)
def test_the_trainer_picks_the_ipc_transport_for_colocated_sglang(standin, tiny_model_dir, tmp_path):
    import requests
    from transformers import AutoModelForCausalLM

    from at_core.config import load_config
    from at_core.rollout import RolloutWorkers
    from sglang_side import digest

    cfg = load_config(overrides=["rollout.backend=sglang", "rollout.colocate=true", "rollout.sync_method=tensor",
                                 f"rollout.urls=[{standin}]", "rollout.sync_bucket_mb=1"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    workers = RolloutWorkers(cfg.rollout, str(tiny_model_dir), tmp_path, rank=0)
    try:
        workers.start(model, weight_version=3)
        assert isinstance(workers.weight_sync.transport, cuda_ipc.CudaIpcTransport)
        served = requests.get(f"{standin}/standin/weights", timeout=10).json()
        assert served["weights"] == digest(list(model.named_parameters())) and served["weight_version"] == "3"
    finally:
        workers.close()
