"""The scaling recipes as a user runs them: real argument parsing in subprocesses (as the
deepspeed launcher and torchrun call the scripts), dry runs against the real architectures,
and a shrunk two-rank rehearsal of a whole three-stage recipe on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from at_core.config import load_config, stage_order
from at_core.plan import SGLANG_RELEASED_GIB, Arch, Hardware, plan
from at_core.recipe import main
from at_core.recorder import read_metrics
from helpers import ROOT, torchrun

MODELS = Path(__file__).resolve().parents[1] / "examples" / "configs" / "models"
RECIPES = {"r1_1p5b": "1.5b", "r1_7b": "7b", "r1_32b": "32b"}


def _script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _recipe(name: str, *overrides: str):
    return load_config(str(ROOT / "examples" / "configs" / f"{name}.yaml"), list(overrides))


@pytest.mark.timeout(120)
def test_help_prints_the_resolved_recipe_without_a_model():
    overrides = ["stage.1.steps=7", "cluster.nodes=8"]
    out = _script("r1_32b", "--help", *overrides)
    assert out.returncode == 0, out.stderr
    cfg = _recipe("r1_32b", *overrides)
    for s in stage_order(cfg):
        st = cfg.stage[s]
        assert (f"stage {s}    {st.steps} steps: {st.prompts_per_step} prompts x {st.rollouts_per_prompt} rollouts "
                f"x {st.max_response_len} tokens") in out.stdout
    assert f"micro-batch {cfg.algorithm.micro_batch_tokens} tokens" in out.stdout
    assert f"ZeRO-{cfg.deepspeed.zero_stage}, offload optimizer yes" in out.stdout
    assert f"tp {cfg.rollout.tp_size}" in out.stdout and f"lr {cfg.algorithm.lr:g}" in out.stdout
    assert f"8 nodes x {cfg.cluster.gpus_per_node} GPUs" in out.stdout
    assert "--dry-run" in out.stdout and "deepspeed --hostfile" in out.stdout

    bad = _script("r1_32b", "--help", "rollout.tp_sise=2")
    assert bad.returncode == 2 and "tp_size" in bad.stderr  # names the valid keys


def _config_dir(tmp_path: Path, size: str) -> Path:
    d = tmp_path / size
    d.mkdir()
    shutil.copy(MODELS / f"r1-distill-qwen-{size}.json", d / "config.json")
    return d


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_dry_run_plans_every_stage_and_renders_the_gpu_launch(name, tmp_path):
    size = RECIPES[name]
    # a directory holding only config.json for two recipes, the json file itself for the third
    model = MODELS / f"r1-distill-qwen-{size}.json" if name == "r1_7b" else _config_dir(tmp_path, size)
    out = _script(name, "--local_rank=0", "--dry-run", "--json", "--model-path", str(model))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    cfg = _recipe(name)
    hw = Hardware.from_cluster(cfg.cluster)
    arch = Arch.from_config(model)
    assert (r["params"], r["cluster"]["gpus"], r["cluster"]["nodes"]) == (arch.params, hw.gpus, hw.nodes)
    assert list(r["stages"]) == stage_order(cfg)
    for s, got in r["stages"].items():
        want = plan(cfg, arch, hw.gpus, hw.gpu_mem_gb, hw.nodes, s, cpu_mem_gb=hw.cpu_mem_gb)
        assert got["per_gpu_gb"] == want["per_gpu_gb"] and got["fits"] == want["fits"]
        assert got["tokens_per_step_est"] == want["tokens_per_step_est"]
    assert r["fits"] and r["peak_gb"] == max(s["per_gpu_gb"]["total"] for s in r["stages"].values())

    ds = r["deepspeed_config"]  # what a GPU rank builds, rendered on this CPU machine
    assert ds["bf16"]["enabled"] and ds["train_batch_size"] == hw.gpus and r["dist_backend"] == "nccl"
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["optimizer"]["params"]["lr"] == cfg.algorithm.lr
    if cfg.deepspeed.offload_optimizer:
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam on GPU machines
    else:
        assert "offload_optimizer" not in ds["zero_optimization"]

    sg = r["sglang"]
    launch = sg["trainer_launch"]
    assert launch[launch.index("--tp-size") + 1] == str(cfg.rollout.tp_size)
    assert launch[launch.index("--mem-fraction-static") + 1] == str(cfg.rollout.mem_fraction)
    assert "--enable-memory-saver" in launch and launch[launch.index("--dtype") + 1] == "bfloat16"
    assert sg["engines_planned"] == hw.gpus // cfg.rollout.tp_size
    assert len(sg["per_node"]) * hw.nodes == sg["engines_planned"]
    assert sg["urls_override"].count("http://") == sg["engines_planned"]
    assert f"--nnodes {hw.nodes} --nproc_per_node {hw.per_node}" in r["launch"]["torchrun"]


@pytest.mark.timeout(180)
def test_dry_run_on_a_cluster_too_small_fails_with_advice_and_external_servers(capsys):
    overrides = ["cluster.nodes=2", "cluster.gpu_mem_gb=40", "deepspeed.offload_optimizer=false",
                 "rollout.urls=[http://h1:30000,http://h2:30000]", "rollout.api_key=k"]
    rc = main(ROOT / "examples/configs/r1_32b.yaml",
              ["--dry-run", "--model-path", str(MODELS / "r1-distill-qwen-32b.json"), *overrides])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "2 node(s) x 8 GPUs x 40 GB = 16 GPUs" in out and "DOES NOT FIT" in out and "suggest: " in out
    tp = _recipe("r1_32b").rollout.tp_size
    assert f"2 external server(s) http://h1:30000, http://h2:30000 (tp {tp} each; weights by CUDA IPC" in out
    # the same two engines of tp 8 on one node of 8 GPUs cannot be placed: an error naming the keys
    overrides[0] = "cluster.nodes=1"
    assert main(ROOT / "examples/configs/r1_32b.yaml",
                ["--dry-run", "--model-path", str(MODELS / "r1-distill-qwen-32b.json"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "rollout.urls lists 2 engines of rollout.tp_size=8, 16 GPUs" in err and "cluster.gpus_per_node" in err


@pytest.mark.timeout(60)
def test_dry_run_errors_name_the_missing_model(tmp_path, capsys):
    assert main(ROOT / "examples/configs/r1_7b.yaml", ["--dry-run", "--model-path", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(ROOT / "examples/configs/r1_7b.yaml", ["--dry-run", "--model-path", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(ROOT / "examples/configs/r1_7b.yaml", ["--rehearse"]) == 2  # nothing to shrink
    assert "--model-path" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_two_rank_rehearsal_runs_all_three_stages_with_the_recipes_shaping(tmp_path):
    name, out = "r1_32b", tmp_path / "rehearsal"
    target = MODELS / "r1-distill-qwen-32b.json"
    proc = torchrun(ROOT / "examples" / f"{name}.py", 2, "--rehearse", "--model-path", str(target), "--out", str(out),
                    timeout=540)
    assert "tiny arithmetic task (data.train_files=[])" in proc.stdout
    recipe = _recipe(name)
    assert [(r["stage"], r["step"]) for r in read_metrics(out)] == [(s, 1) for s in stage_order(recipe)]
    ran = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert ran["data"]["train_files"] == [] and ran["model"]["dtype"] == "fp32"
    assert ran["deepspeed"]["offload_optimizer"] == recipe.deepspeed.offload_optimizer  # the recipe's ZeRO setup
    for s in stage_order(recipe):  # each stage's reward shaping is the recipe's
        assert ran["stage"][s]["shaping"] == OmegaConf.to_container(recipe.stage[s].shaping), s
        assert ran["stage"][s]["prompt_style"] == recipe.stage[s].prompt_style, s
        assert (out / "export" / f"stage{s}" / "config.json").is_file()
    small = json.loads((out / "rehearsal_model" / "config.json").read_text())
    big = json.loads(target.read_text())
    assert small["model_type"] == big["model_type"] and small["tie_word_embeddings"] == big["tie_word_embeddings"]
    assert small["num_attention_heads"] // small["num_key_value_heads"] == \
        big["num_attention_heads"] // big["num_key_value_heads"]
    assert small["num_hidden_layers"] < big["num_hidden_layers"] and small["hidden_size"] < big["hidden_size"]
    from transformers import AutoTokenizer

    assert small["vocab_size"] == len(AutoTokenizer.from_pretrained(out / "rehearsal_model"))


@pytest.mark.timeout(120)
def test_gpu_step_benchmark_prints_the_prediction_and_refuses_cpu():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "r1_1p5b_gpu_step.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr, out.stderr[-3000:]
    cfg = _recipe("r1_1p5b")
    want = plan(cfg, Arch.from_config(MODELS / "r1-distill-qwen-1.5b.json"), 1, 80.0, 1, "1")
    # the planner's prediction is shown anyway (less its allowance for an idle colocated SGLang)
    assert f"train phase {want['per_gpu_gb']['train_phase'] - SGLANG_RELEASED_GIB:.2f} GB" in out.stdout


def test_hostfile_and_deepspeed_env_examples_parse_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = _parse_hostfile((ROOT / "examples" / "hostfile.example").read_text().splitlines())
    cfg = _recipe("r1_7b")
    assert len(hosts) == cfg.cluster.nodes and set(hosts.values()) == {cfg.cluster.gpus_per_node}
    # DeepSpeed splits every line of .deepspeed_env on its first '=': no comments, no blank lines
    lines = (ROOT / "examples" / ".deepspeed_env.example").read_text().splitlines()
    pairs = dict(line.split("=", 1) for line in lines)
    assert len(pairs) == len(lines) and all(k and k == k.strip() and not k.startswith("#") for k in pairs)
    assert pairs["DS_ACCELERATOR"] == "cuda" and "PYTHONPATH" in pairs
