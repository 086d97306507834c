"""Engine placement and the weight-sync transport each recipe gets; placements that cannot work."""
from pathlib import Path

import pytest

from at_core.config import load_config
from at_rollout.placement import resolve, runtime_ipc_placements
from at_rollout.backends.sglang import check_rollout_config, sglang_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe,tp", [("r1_1p5b", 1), ("r1_7b", 1), ("r1_32b", 8)])
def test_recipes_are_colocated_over_cuda_ipc(recipe, tp):
    cfg = load_config([str(ROOT / f"examples/configs/{recipe}.yaml")])
    p = resolve(cfg.rollout, nodes=cfg.cluster.nodes, gpus_per_node=cfg.cluster.gpus_per_node)
    assert p.sync == "cuda_ipc" and p.colocate and p.tp_size == tp
    assert p.engines == cfg.cluster.nodes * cfg.cluster.gpus_per_node // tp
    assert p.launched.gpus == tuple(range(tp)) and p.trainer_gpus_per_node == cfg.cluster.gpus_per_node
    # engine i of the urls' node-major order: node i // per node, TP rank k on local GPU (i % per node) * tp + k
    last = p.engine(p.engines - 1)
    assert last.node == cfg.cluster.nodes - 1 and last.gpus[-1] == cfg.cluster.gpus_per_node - 1
    cmd = sglang_command(cfg.rollout, "model", 30000)
    assert cmd[cmd.index("--base-gpu-id") + 1] == "0" and "--enable-memory-saver" in cmd
    check_rollout_config(cfg.rollout)


def test_engines_on_their_own_gpus_use_nccl_after_the_trainer_gpus():
    cfg = load_config(overrides=["rollout.backend=sglang", "rollout.sync_method=distributed", "rollout.tp_size=2"])
    p = resolve(cfg.rollout, nodes=2, gpus_per_node=8, rollout_gpus=8)
    assert p.sync == "nccl_broadcast" and p.trainer_gpus_per_node == 4 and p.engines_per_node == 2
    assert p.launched.gpus == (4, 5) and p.engine(3).gpus == (6, 7) and p.engine(3).node == 1
    assert "placement: weight sync nccl_broadcast" in p.describe() and "--base-gpu-id 4" in p.describe()
    assert sglang_command(cfg.rollout, "m", 1, base_gpu_id=p.launched.gpus[0])[-1] != "--enable-memory-saver"


@pytest.mark.parametrize("overrides,keys", [
    (["rollout.colocate=true", "rollout.sync_method=distributed"], ["rollout.colocate", "rollout.sync_method"]),
    (["rollout.colocate=false", "rollout.sync_method=tensor"], ["rollout.sync_method", "rollout.colocate"]),
    (["rollout.colocate=true", "rollout.sync_method=tensor", "rollout.base_gpu_id=7", "rollout.tp_size=2"],
     ["rollout.base_gpu_id", "rollout.tp_size", "cluster.gpus_per_node"]),
    (["rollout.colocate=false", "rollout.sync_method=distributed", "rollout.base_gpu_id=1"],
     ["rollout.base_gpu_id"]),
    (["rollout.colocate=true", "rollout.sync_method=tensor", "rollout.tp_size=4",
      "rollout.urls=[http://a:1,http://b:1,http://c:1]", "rollout.api_key=k"], ["rollout.urls", "rollout.tp_size"]),
    (["rollout.colocate=true", "rollout.sync_method=tensor", "rollout.tp_size=3"], ["rollout.tp_size"]),
])
def test_placements_that_cannot_work_name_the_keys(overrides, keys):
    cfg = load_config(overrides=["rollout.backend=sglang", *overrides])
    with pytest.raises(ValueError) as err:
        resolve(cfg.rollout, nodes=1, gpus_per_node=8)
    for key in keys:
        assert key in str(err.value), (key, str(err.value))


def test_the_launcher_refuses_what_can_never_work_on_any_cluster():
    cfg = load_config([str(ROOT / "examples/configs/r1_7b.yaml")], ["rollout.sync_method=distributed"])
    with pytest.raises(ValueError, match="NCCL refuses a group holding the same GPU twice"):
        check_rollout_config(cfg.rollout)


def test_plan_and_dry_run_print_the_placement(capsys):
    from at_core.plan import main

    from test_recipes import MODELS

    models = MODELS / "r1-distill-qwen-7b.json"
    if not models.is_file():
        pytest.skip(f"the recipe architectures are not on this machine ({models})")
    rc = main(["--config", str(ROOT / "examples/configs/r1_7b.yaml"), "--model-path", str(models)])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "placement: weight sync cuda_ipc" in out and "--base-gpu-id 0" in out
    rc = main(["--config", str(ROOT / "examples/configs/r1_7b.yaml"), "--model-path", str(models),
               "rollout.sync_method=distributed"])
    assert rc == 2 and "rollout.sync_method=distributed" in capsys.readouterr().err


def test_runtime_placements_follow_the_launcher(monkeypatch):
    cfg = load_config(overrides=["rollout.backend=sglang", "rollout.colocate=true", "rollout.tp_size=2",
                                 "rollout.urls=[http://a:1,http://a:2,http://b:1,http://b:2]", "rollout.api_key=k"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    got = runtime_ipc_placements(cfg.rollout, 4)
    assert [(p.node, p.gpus) for p in got] == [(0, (0, 1)), (0, (2, 3)), (1, (0, 1)), (1, (2, 3))]
    launched = load_config(overrides=["rollout.backend=sglang", "rollout.colocate=true", "rollout.base_gpu_id=2"])
    assert [(p.node, p.gpus) for p in runtime_ipc_placements(launched.rollout, 1)] == [(0, (2,))]
