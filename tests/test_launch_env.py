"""Launching SGLang for real: under a real `torchrun`, with a stand-in `sglang.launch_server`
module on PYTHONPATH that records the environment and arguments it was started with.
Readiness must wait for /health_generate (the stand-in's /health answers 200 at once, as
SGLang's does before its engine can serve), and an engine that exits at start must end a
training run with exit code 2, its log tail and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT, free_port

STAND_IN = '''
"""A stand-in for `python -m sglang.launch_server` (test_launch_env.py)."""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

record = os.environ["STANDIN_RECORD"]
with open(record, "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
if os.environ.get("STANDIN_MODE") == "exit":
    print("RuntimeError: stand-in engine failed: CUDA out of memory while loading the weights", flush=True)
    sys.exit(1)
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
born = time.time()
ready_after = float(os.environ.get("STANDIN_READY_AFTER", "1.5"))
hits = []

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" or time.time() - born > ready_after
        hits.append((self.path, ok, time.time()))
        with open(record + ".hits", "w") as f:
            json.dump(hits, f)
        self.send_response(200 if ok else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass

HTTPServer(("127.0.0.1", port), H).serve_forever()
'''

DRIVER = '''
import json, os, sys, time
from at_core.config import load_config
from at_rollout.backends.sglang import SGLangServer

cfg = load_config(overrides=["rollout.backend=sglang", "rollout.sync_method=distributed",
                             "rollout.startup_timeout_s=60"]).rollout
server = SGLangServer(cfg, "/models/stand-in", seed=3, log_file=sys.argv[2])
assert os.environ["RANK"] == "0" and "MASTER_PORT" in os.environ  # we do run under torchrun
server.start()
started = time.time()
server.stop()
with open(sys.argv[1], "w") as f:
    json.dump({"started": started, "parent_env": dict(os.environ)}, f)
'''


def stand_in_package(root: Path) -> Path:
    pkg = root / "standin" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(textwrap.dedent(STAND_IN))
    return root / "standin"


@pytest.mark.timeout(180)
def test_sglang_child_gets_a_clean_environment_under_torchrun(tmp_path):
    path = stand_in_package(tmp_path)
    record, result, driver = tmp_path / "record.json", tmp_path / "result.json", tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)]), "STANDIN_RECORD": str(record),
           "AT_SOMETHING": "ours", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TEST": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           f"--master_port={free_port()}", str(driver), str(result), str(tmp_path / "sglang.log")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    child = json.loads(record.read_text())
    parent = json.loads(result.read_text())["parent_env"]
    launcher = [k for k in parent if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                           "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
                or k.startswith(("TORCHELASTIC_", "AT_", "DEEPSPEED_", "DS_"))]
    assert {"RANK", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "AT_SOMETHING", "DS_ACCELERATOR"} <= set(launcher)
    assert not [k for k in launcher if k in child["env"]], "launcher variables reached the SGLang child"
    for kept in ("PATH", "PYTHONPATH", "STANDIN_RECORD", "OMP_NUM_THREADS"):
        assert child["env"][kept] == parent[kept]
    argv = child["argv"]
    assert argv[argv.index("--model-path") + 1] == "/models/stand-in" and "--skip-server-warmup" in argv
    assert argv[argv.index("--random-seed") + 1] == "3"
    # Ready only once /health_generate said 200, though /health said so from the start.
    hits = json.loads(Path(str(record) + ".hits").read_text())
    first_ok = min(t for p, ok, t in hits if p == "/health_generate" and ok)
    assert any(p == "/health_generate" and not ok for p, ok, _ in hits)
    assert json.loads(result.read_text())["started"] >= first_ok


@pytest.mark.timeout(240)
def test_engine_that_exits_at_start_ends_the_run_with_exit_2_and_its_log(tiny_model_dir, tmp_path):
    path = stand_in_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)]), "STANDIN_MODE": "exit",
           "STANDIN_RECORD": str(tmp_path / "record.json"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "at_core.train", "--model-path", str(tiny_model_dir), "--out",
                           str(tmp_path / "run"), "rollout.backend=sglang", "rollout.sync_method=distributed",
                           "rollout.startup_timeout_s=60"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "stand-in engine failed: CUDA out of memory" in proc.stderr  # the engine's log tail
    assert "exited with code 1" in proc.stderr
    assert "Traceback" not in out, out[-4000:]


@pytest.mark.timeout(60)
def test_a_run_that_ends_during_the_grading_warm_up_prints_no_traceback(tmp_path):
    # The trainer builds its grading pool before it launches the engine; an engine that fails
    # at once ends the run while the pool's zygote is still importing math-verify.
    code = "from at_reward.pool import GradingPool; GradingPool(workers=1); import sys; sys.exit(2)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, err = proc.communicate(timeout=50)  # the zygote inherits stderr: EOF once it has exited too
    assert proc.returncode == 2 and "Traceback" not in err, err
