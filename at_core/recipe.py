"""The scaling recipes' runner: the one entry behind `examples/r1_1p5b.py`, `r1_7b.py`, `r1_32b.py`.

    python examples/r1_7b.py --help                              the recipe, resolved
    python examples/r1_7b.py --dry-run --model-path DIR|config.json   plan, DeepSpeed, SGLang; no GPU
    torchrun --nproc_per_node 2 examples/r1_7b.py --rehearse --model-path DIR|config.json
    deepspeed --hostfile hostfile examples/r1_7b.py --model-path DIR [key.sub=value ...]

A recipe is its YAML file read through the trainer's own parser and overrides
(`at_core.train`), so what `--dry-run` plans and what `--rehearse` runs on a CPU is the
configuration the cluster will run, not a copy of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from at_core.config import ConfigError, stage_order
from at_core.train import build_parser, load_train_problems, require_model_dir, resolve_config, setup_logging

SGLANG_BASE_PORT = 30000
REHEARSAL_SCALE = 32  # prompts per step and mini-batch prompts shrink by this factor (128 -> 4, 64 -> 2)
REHEARSAL_TOKENS = 1024  # response length caps shrink by this factor (8192 -> 8, 24576 -> 24)


def build_recipe_parser(name: str) -> argparse.ArgumentParser:
    p = build_parser(prog=f"examples/{name}.py", description=_launch_help(name))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="plan every stage on the `cluster:` section, print the DeepSpeed config and the "
                           "SGLang command lines, exit (0: fits, 1: does not fit, 2: error); no GPU needed")
    mode.add_argument("--rehearse", action="store_true",
                      help="run the recipe shrunk on CPU: --model-path's architecture with fewer, narrower "
                           "layers and the tiny tokenizer, fp32, the project's rollout server, the tiny "
                           "arithmetic task, 1 step per stage (each stage's reward shaping kept)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the result as JSON")
    return p


def _launch_help(name: str) -> str:
    return (f"AutoThink scaling recipe {name} (examples/configs/{name}.yaml).\n\n"
            f"  deepspeed --hostfile hostfile examples/{name}.py --model-path DIR [key.sub=value ...]\n"
            f"  torchrun --nnodes N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\\n"
            f"      examples/{name}.py --model-path DIR\n"
            f"  ... rollout.urls=[http://h1:30000,http://h2:30000] rollout.api_key=KEY   (external SGLang)\n"
            f"  ... --resume auto   (after a crash; the run directory on a shared filesystem)")


def main(config_yaml: str | Path, argv: Optional[Sequence[str]] = None) -> int:
    """Parse, resolve and dispatch: `--help` (the recipe), `--dry-run`, `--rehearse`, or the real run."""
    config_yaml = Path(config_yaml)
    name = config_yaml.stem
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_recipe_parser(name)
    wants_help = any(a in ("-h", "--help") for a in argv)
    args = parser.parse_intermixed_args([a for a in argv if a not in ("-h", "--help")])
    try:
        if args.rehearse:
            args = prepare_rehearsal(args, config_yaml)
        cfg = resolve_config(args, [str(config_yaml)])
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if wants_help:
            print(parser.format_help())
        print(f"error: {err}", file=sys.stderr)
        return 2
    if wants_help:
        print(parser.format_help())
        print(describe(cfg, config_yaml))
        return 0
    if args.dry_run:
        return dry_run(cfg, config_yaml, as_json=args.json)
    if args.rehearse and os.environ.get("RANK", "0") == "0":
        print(rehearsal_banner(cfg, name), flush=True)
    return run(cfg)


def run(cfg: DictConfig) -> int:
    """The real run (also the rehearsal's): `at_core.trainer.train` on the resolved config."""
    from at_core.data import DataError

    try:
        if not cfg.model.path:
            raise ConfigError("model.path is required (an HF model directory; --model-path DIR)")
        require_model_dir(cfg.model.path)
        problems = load_train_problems(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging()
    from at_core.trainer import train

    train(cfg, problems, cfg.model.path)
    return 0


# ---------------------------------------------------------------- --help: the recipe, resolved


def describe(cfg: DictConfig, config_yaml: Path) -> str:
    """The settings that make the recipe, after the YAML and any overrides on the command line."""
    m, a, ds, ro, cl = cfg.model, cfg.algorithm, cfg.deepspeed, cfg.rollout, cfg.cluster
    lines = [f"recipe {config_yaml.stem} ({config_yaml}), resolved:",
             f"  model      {m.path or '(none: --model-path DIR)'}  dtype {m.dtype}, gradient checkpointing "
             f"{'on' if m.gradient_checkpointing else 'off'}, attention {m.attn_implementation}",
             f"  data       {', '.join(cfg.data.train_files) or 'the tiny arithmetic task'} (long prompts: "
             f"{cfg.data.long_prompts})",
             f"  reward     {cfg.reward.name}, {cfg.reward.rules} rules, degeneration penalty "
             f"{_yn(cfg.reward.degeneration_penalty)}"]
    for s in stage_order(cfg):
        st = cfg.stage[s]
        shaping = OmegaConf.to_object(st.shaping).describe()
        fresh = [k for k in ("reset_optimizer", "reshuffle") if st[k]]
        lr = st.lr if st.lr is not None else a.lr
        lines.append(f"  stage {s}    {st.steps} steps: {st.prompts_per_step} prompts x {st.rollouts_per_prompt} "
                     f"rollouts x {st.max_response_len} tokens, {st.prompt_style} prompt, T={st.temperature}, "
                     f"lr {lr:g}; {shaping}" + (f"; {', '.join(fresh)}" if fresh else ""))
    kl = f"KL {a.kl_coef} ({a.kl_estimator})" if a.kl_coef > 0 else "KL off"
    lines += [f"  algorithm  {a.advantage} ({a.policy_loss}, {a.loss_agg}), lr {a.lr:g}, weight decay "
              f"{a.weight_decay:g}, clip {a.clip_low}/{a.clip_high}, {kl}, entropy {a.entropy_coef}, "
              f"mini-batch {a.mini_batch_prompts or 'whole step'} prompts, micro-batch {a.micro_batch_tokens} tokens, "
              f"log-prob chunk {a.logprob_chunk}",
              f"  deepspeed  ZeRO-{ds.zero_stage}, offload optimizer {_yn(ds.offload_optimizer)}, "
              f"offload params {_yn(ds.offload_param)}",
              f"  rollout    {', '.join(ro.urls) if ro.urls else ro.backend}: tp {ro.tp_size}, mem_fraction "
              f"{ro.mem_fraction}, {'colocated' if ro.colocate else 'separate GPUs'}, weight sync {ro.sync_method} "
              f"({ro.sync_bucket_mb} MB buckets)",
              f"  cluster    {cl.nodes} nodes x {cl.gpus_per_node} GPUs x {cl.gpu_mem_gb:g} GB = "
              f"{cl.nodes * cl.gpus_per_node} GPUs" + (f", {cl.cpu_mem_gb:g} GB host memory per node"
                                                        if cl.cpu_mem_gb else ""),
              f"  run        {cfg.out_dir} (checkpoint every {cfg.save_every} steps, resume {cfg.resume or 'off'})",
              "", f"--dry-run plans this on the cluster; override any of it as key.sub=value (cluster.nodes=8)."]
    return "\n".join(lines)


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------- --dry-run


def gpu_deepspeed_config(cfg: DictConfig, world: int) -> Dict[str, Any]:
    """The DeepSpeed config a GPU rank of a `world`-rank run builds, rendered on any machine."""
    from at_core.engines import deepspeed_config

    conf = deepspeed_config(cfg, gpu=True)
    conf["train_batch_size"] = world * conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"]
    return conf


def sglang_commands(cfg: DictConfig, engines_total: int, nodes: int, where: Any = None) -> Dict[str, Any]:
    """What serves rollouts: the configured URLs, or the command the trainer runs, plus one node's engines.

    The trainer itself launches a single engine (rank 0's node); the plan counts one engine per
    `tp_size` GPUs everywhere. Those are started by hand (one server per engine, so the weight
    sync's group is 1 + tp_size x servers) and passed as `rollout.urls`. `where` (an
    `at_rollout.placement.Placement`) puts each engine on its GPUs; by default engine e of a
    node takes GPUs e*tp .. e*tp+tp-1.
    """
    from at_rollout.backends import get_backend

    ro = cfg.rollout
    backend = get_backend(ro.backend)
    dtype = "float32" if cfg.model.dtype == "fp32" else "bfloat16"
    out: Dict[str, Any] = {"engines_planned": engines_total, "tp_size": ro.tp_size, "urls": list(ro.urls),
                           "trainer_launch": None, "per_node": [], "urls_override": None,
                           "backend": backend.description}
    if ro.urls:
        out["weight_sync_world"] = 1 + ro.tp_size * len(ro.urls)
        return out
    backend.check_config(ro)
    out["trainer_launch"] = backend.launch_command(ro, cfg.model.path, ro.port or SGLANG_BASE_PORT, seed=cfg.seed,
                                                   dtype=dtype, base_gpu_id=where.launched.gpus[0] if where else None)
    per_node = max(1, engines_total // nodes)
    remote = OmegaConf.merge(ro, {"host": "0.0.0.0", "api_key": ro.api_key or "$SGLANG_API_KEY"})
    for e in range(per_node):
        placed = where.engine(e).gpus if where else range(e * ro.tp_size, (e + 1) * ro.tp_size)
        gpus = ",".join(str(g) for g in placed)
        cmd = backend.launch_command(remote, cfg.model.path, SGLANG_BASE_PORT + e, seed=cfg.seed, dtype=dtype,
                                     python="python", base_gpu_id=0)  # GPU 0 of those CUDA_VISIBLE_DEVICES shows
        out["per_node"].append(f"CUDA_VISIBLE_DEVICES={gpus} " + shlex.join(cmd).replace("'$SGLANG_API_KEY'",
                                                                                           "$SGLANG_API_KEY"))
    urls = [f"http://node{n}:{SGLANG_BASE_PORT + e}" for n in range(nodes) for e in range(per_node)]
    out["urls_override"] = f"rollout.urls=[{','.join(urls)}] rollout.api_key=$SGLANG_API_KEY"
    return out


def dry_run(cfg: DictConfig, config_yaml: Path, *, as_json: bool = False) -> int:
    """Meta-device model, per-stage plan on `cfg.cluster`, DeepSpeed config, SGLang commands; 0 when it fits."""
    from at_core.plan import Arch, Hardware, format_table, plan
    from at_rollout.placement import resolve

    t0 = time.perf_counter()
    try:
        if not cfg.model.path:
            raise ConfigError("no model: pass --model-path DIR (a directory with config.json, or the json itself)")
        arch = Arch.from_config(cfg.model.path, dtype="fp32" if cfg.model.dtype == "fp32" else "bf16")
        hw = Hardware.from_cluster(cfg.cluster)
        plans = {s: plan(cfg, arch, hw.gpus, hw.gpu_mem_gb, hw.nodes, s, cpu_mem_gb=hw.cpu_mem_gb)
                 for s in stage_order(cfg)}
        worst = max(plans.values(), key=lambda p: p["per_gpu_gb"]["total"])
        world = worst["train_gpus"]
        ds_conf = gpu_deepspeed_config(cfg, world)
        where = resolve(cfg.rollout, nodes=hw.nodes, gpus_per_node=hw.per_node,
                        rollout_gpus=None if cfg.rollout.colocate else worst["rollout_gpus"])
        sglang = sglang_commands(cfg, worst["engines"], hw.nodes, where)
    except FileNotFoundError as err:
        print(f"error: {err} (pass --model-path DIR, or the config json itself)", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fits = all(p["fits"] for p in plans.values())
    name = config_yaml.stem
    launch = {
        "deepspeed": f"deepspeed --hostfile hostfile examples/{name}.py --model-path {cfg.model.path}",
        "torchrun": f"torchrun --nnodes {hw.nodes} --nproc_per_node {hw.per_node} --rdzv_backend c10d "
                    f"--rdzv_endpoint HOST:29500 examples/{name}.py --model-path {cfg.model.path}",
    }
    result = {"recipe": name, "config": str(config_yaml), "model": cfg.model.path, "arch": arch.name,
              "params": arch.params, "layers": arch.layers, "hidden": arch.hidden, "vocab": arch.vocab,
              "cluster": {"nodes": hw.nodes, "gpus_per_node": hw.per_node, "gpus": hw.gpus,
                          "gpu_mem_gb": hw.gpu_mem_gb, "cpu_mem_gb": hw.cpu_mem_gb},
              "fits": fits, "worst_stage": worst["stage"], "peak_gb": worst["per_gpu_gb"]["total"],
              "stages": {s: {k: p[k] for k in ("fits", "per_gpu_gb", "micro_batch_tokens", "cpu_gb_per_node",
                                               "kv_concurrency", "engines", "sequences", "tokens_per_step_max",
                                               "tokens_per_step_est", "notes", "suggestions")}
                         for s, p in plans.items()},
              "deepspeed_config": ds_conf, "dist_backend": "nccl", "sglang": sglang, "launch": launch,
              "placement": worst["placement"],
              "seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(_format_dry_run(cfg, result, format_table(worst, cfg)))
    return 0 if fits else 1


def _format_dry_run(cfg: DictConfig, r: Dict[str, Any], worst_table: str) -> str:
    c = r["cluster"]
    lines = [f"recipe {r['recipe']} ({r['config']})",
             f"model {r['model']}: {r['arch']}, {r['params'] / 1e9:.2f}B params, {r['layers']} layers, hidden "
             f"{r['hidden']}, vocab {r['vocab']} (built on the meta device from config.json alone)",
             f"cluster: {c['nodes']} node(s) x {c['gpus_per_node']} GPUs x {c['gpu_mem_gb']:g} GB = {c['gpus']} GPUs"
             + (f", {c['cpu_mem_gb']:g} GB host memory per node" if c["cpu_mem_gb"] else ""), "",
             f"{'stage':<6}{'prompts x rollouts x len':<26}{'peak GB/GPU':>12}{'train GB':>10}{'CPU GB/node':>13}"
             f"{'tokens/step est':>17}{'max':>13}  fits"]
    for s, p in r["stages"].items():
        st = cfg.stage[s]
        gb = p["per_gpu_gb"]
        lines.append(f"{s:<6}{f'{st.prompts_per_step} x {st.rollouts_per_prompt} x {st.max_response_len}':<26}"
                     f"{gb['total']:>12.2f}{gb['train_phase']:>10.2f}{p['cpu_gb_per_node']:>13.1f}"
                     f"{p['tokens_per_step_est']:>17,}{p['tokens_per_step_max']:>13,}  {_yn(p['fits'])}")
    lines += ["", f"worst stage {r['worst_stage']}, in detail:", worst_table, "",
              f"DeepSpeed config of each of the {r['deepspeed_config']['train_batch_size']} ranks "
              f"(GPU: {r['dist_backend'].upper()}, bf16 {_yn(r['deepspeed_config']['bf16']['enabled'])}):",
              json.dumps(r["deepspeed_config"], indent=2), ""]
    sg = r["sglang"]
    if sg["urls"]:
        sync = ("weights by CUDA IPC from the trainer ranks on their GPUs" if r["placement"]["sync"] == "cuda_ipc"
                else f"weight-sync group of {sg['weight_sync_world']} ranks")
        lines.append(f"rollout: {len(sg['urls'])} external server(s) {', '.join(sg['urls'])} (tp {sg['tp_size']} each; "
                     f"{sync}); the plan assumes "
                     f"{sg['engines_planned']} engines")
    else:
        lines += [f"{sg['backend']} the trainer launches on rank 0's node (one engine; the port is picked at launch):",
                  "  " + shlex.join(sg["trainer_launch"])]
        lines += [f"the plan counts {sg['engines_planned']} engines of tp {sg['tp_size']}: to serve with all of them, "
                  f"start on every node:"] + [f"  {c}" for c in sg["per_node"]]
        lines += [f"and pass (node names from your hostfile): {sg['urls_override']}"]
    lines += ["", "launch:", f"  {r['launch']['deepspeed']}", f"  {r['launch']['torchrun']}", "",
              f"{'FITS' if r['fits'] else 'DOES NOT FIT'}: peak {r['peak_gb']} GB per GPU (stage {r['worst_stage']}); "
              f"dry run took {r['seconds']} s"]
    return "\n".join(lines)


# ---------------------------------------------------------------- --rehearse


def prepare_rehearsal(args: argparse.Namespace, config_yaml: Path) -> argparse.Namespace:
    """Shrink overrides go between the recipe and the user's own overrides; the shrunk model is built once."""
    recipe = resolve_config(args, [str(config_yaml)])  # the recipe as the user asked for it
    source = recipe.model.path
    if not source or not Path(source).exists():
        raise ConfigError(f"model.path={source}: no such directory or file (--rehearse shrinks the recipe's "
                          "architecture: pass --model-path DIR or the model's config json)")
    out_dir = Path(args.out or f"{recipe.out_dir}_rehearsal")
    model_dir = ensure_rehearsal_model(source, out_dir / "rehearsal_model", seed=recipe.seed)
    new = argparse.Namespace(**vars(args))
    new.overrides = rehearsal_overrides(recipe) + list(args.overrides)
    new.model_path, new.out = str(model_dir), str(out_dir)
    return new


def rehearsal_banner(cfg: DictConfig, name: str) -> str:
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(cfg.model.path)
    stages = "; ".join(f"{s}: {cfg.stage[s].steps} step of {cfg.stage[s].prompts_per_step} x "
                       f"{cfg.stage[s].rollouts_per_prompt} x {cfg.stage[s].max_response_len}" for s in stage_order(cfg))
    return (f"rehearsal of {name}: {mc.model_type} shrunk to {mc.num_hidden_layers} layers x hidden {mc.hidden_size} "
            f"({mc.num_attention_heads} heads / {mc.num_key_value_heads} KV), vocab {mc.vocab_size} (tiny tokenizer), "
            f"{cfg.model.dtype}, ZeRO-{cfg.deepspeed.zero_stage} offload optimizer "
            f"{_yn(cfg.deepspeed.offload_optimizer)}, the project's rollout server; training on the tiny arithmetic "
            f"task (data.train_files=[]); stages {stages}; run directory {cfg.out_dir}")


def rehearsal_overrides(cfg: DictConfig) -> List[str]:
    """The recipe at toy scale: shapes shrink, the algorithm and each stage's reward shaping stay."""
    mbp = cfg.algorithm.mini_batch_prompts
    out = ["model.dtype=fp32", "data.train_files=[]", "data.eval_files=[]", "data.tiny_train_size=64",
           "reward.workers=1", "rollout.backend=server", "rollout.urls=[]", "rollout.tp_size=1",
           "rollout.host=127.0.0.1", "rollout.port=0", "rollout.api_key=null", "rollout.retries=1",
           "rollout.startup_timeout_s=120", "rollout.request_timeout_s=120", "rollout.sync_bucket_mb=1",
           "algorithm.micro_batch_tokens=128", "algorithm.logprob_chunk=64",
           f"algorithm.mini_batch_prompts={max(1, math.ceil(mbp / REHEARSAL_SCALE)) if mbp else 'null'}",
           "save_every=0", "cluster.nodes=1", "cluster.gpus_per_node=2"]
    for s in stage_order(cfg):
        st = cfg.stage[s]
        out += [f"stage.{s}.steps={min(st.steps, 1)}",
                f"stage.{s}.prompts_per_step={max(2, math.ceil(st.prompts_per_step / REHEARSAL_SCALE))}",
                f"stage.{s}.rollouts_per_prompt={min(st.rollouts_per_prompt, 2)}",
                f"stage.{s}.max_response_len={max(8, st.max_response_len // REHEARSAL_TOKENS)}"]
    return out


def shrink_config(target: Any, tokenizer: Any, *, layers: int = 2, head_dim: int = 16) -> Any:
    """The target's architecture (family, GQA ratio, MLP ratio, norms, RoPE, tying) at toy width and depth."""
    from transformers import AutoConfig

    d = target.to_dict()
    heads = target.num_attention_heads
    kv = getattr(target, "num_key_value_heads", None) or heads
    new_heads = max(2, heads // kv)  # one KV head, as many query heads per KV head as the target
    hidden = new_heads * head_dim
    ratio = target.intermediate_size / target.hidden_size
    for key in ("layer_types", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
        d.pop(key, None)
    d.update(hidden_size=hidden, intermediate_size=8 * max(1, round(hidden * ratio / 8)), num_hidden_layers=layers,
             num_attention_heads=new_heads, num_key_value_heads=1, vocab_size=len(tokenizer),
             max_position_embeddings=2048, max_window_layers=layers, bos_token_id=tokenizer.bos_token_id,
             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if "head_dim" in d:
        d["head_dim"] = head_dim
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def ensure_rehearsal_model(source: str | Path, model_dir: Path, seed: int = 0, timeout_s: float = 300.0) -> Path:
    """Build the shrunk model once per node (local rank 0, atomically); the other ranks wait for it."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return model_dir
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.time() + timeout_s
        while not (model_dir / "config.json").is_file():
            if time.time() > deadline:
                raise FileNotFoundError(f"the rehearsal model {model_dir} did not appear within {timeout_s:.0f} s "
                                        "(local rank 0 builds it)")
            time.sleep(0.2)
        return model_dir
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from at_core.meta import load_model_config
    from at_core.tiny import SAMPLE_CORPUS
    from at_core.tiny.model import save_model
    from at_core.tiny.tokenizer import build_tokenizer

    target = load_model_config(source)
    tmp = model_dir.with_name(f"{model_dir.name}.tmp{os.getpid()}")
    build_tokenizer(tmp, SAMPLE_CORPUS * 20, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shrink_config(target, tokenizer), dtype=torch.float32)
    save_model(model, tokenizer, tmp)
    try:
        tmp.rename(model_dir)
    except OSError:  # another node's rank 0 on a shared filesystem got there first (same seed, same model)
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir
