"""The client's contract with SGLang, checked against SGLang's own source.

For every supported release (`at_rollout.backends.sglang.SUPPORTED_VERSIONS`) the wheel is fetched
with `pip download --no-deps` into a cache outside the repository ($AT_SGLANG_WHEEL_CACHE,
default ~/.cache/autothink/sglang-wheels) and the few source files needed are parsed
straight from the zip with `ast` (SGLang is never imported). Checked: every route the client
calls (and with which method), every field it sends (`protocol.SGLANG_REQUESTS`, the
sampling knobs) against SGLang's request structs, every response key it reads (/generate
outputs and meta_info, finish reasons, /model_info, /server_info, the weight endpoints'
answers), the weight-update session's presence exactly from `SESSION_SINCE`, and the
launcher's flags against ServerArgs. A missing name fails naming version, struct and field.
The tests skip, saying why, only when the package registry cannot be reached.
"""
from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from at_core.config import load_config
from at_rollout.protocol import version_tuple as _version
from at_rollout.protocol import (
    FINISH_REASON_READ, META_INFO_READ, MODEL_INFO_READ, OUTPUT_READ, SAMPLING_FIELDS, SERVER_INFO_READ,
    SESSION_ROUTES, SESSION_SINCE, SGLANG_BODYLESS, SGLANG_REQUESTS, UPDATE_ANSWER_READ,
)
from at_rollout.backends.sglang import SUPPORTED_VERSIONS, sglang_command

CACHE = Path(os.environ.get("AT_SGLANG_WHEEL_CACHE", Path.home() / ".cache" / "autothink" / "sglang-wheels"))
UNREACHABLE = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
               "Network is unreachable", "Could not fetch URL", "ProxyError", "Max retries exceeded",
               "Name or service not known", "timed out")
SRT = "sglang/srt/"


def wheel(version: str) -> Path:
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           f"sglang=={version}", "-d", str(CACHE), "-q"], capture_output=True, text=True, timeout=600)
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        if any(s in proc.stdout + proc.stderr for s in UNREACHABLE):
            pytest.skip(f"the package registry cannot be reached to fetch sglang=={version}: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
        raise AssertionError(f"pip download sglang=={version} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return found[0]


class Source:
    """The parsed modules of one SGLang wheel (parsed on first use)."""

    def __init__(self, version: str):
        self.version = version
        self.zip = zipfile.ZipFile(wheel(version))
        self.names = set(self.zip.namelist())

    @functools.lru_cache(maxsize=None)
    def tree(self, path: str) -> ast.Module:
        return ast.parse(self.zip.read(path).decode(), filename=path)

    def classes(self, path: str) -> dict:
        """class name -> (base names, annotated field names, __init__ argument names)."""
        out = {}
        for node in ast.walk(self.tree(path)):
            if isinstance(node, ast.ClassDef):
                fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                          and isinstance(s.target, ast.Name)]
                init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
                args = [a.arg for a in init.args.args + init.args.kwonlyargs][1:] if init else []
                out[node.name] = ([ast.unparse(b).split(".")[-1] for b in node.bases], fields + args)
        return out

    def fields(self, path: str, name: str) -> set:
        """A struct's fields, its base classes' (in the same module) included."""
        classes = self.classes(path)
        assert name in classes, f"SGLang {self.version}: {path} has no struct {name}"
        bases, fields = classes[name]
        out = set(fields)
        for base in bases:
            if base in classes:
                out |= self.fields(path, base)
        return out

    def routes(self) -> dict:
        """path -> set of HTTP methods, from http_server.py's `@app.get/post/put/api_route`."""
        out: dict = {}
        for node in ast.walk(self.tree(SRT + "entrypoints/http_server.py")):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                        and ast.unparse(deco.func.value) == "app" and deco.args
                        and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                    continue
                kind = deco.func.attr
                if kind == "api_route":
                    methods = next((ast.literal_eval(k.value) for k in deco.keywords if k.arg == "methods"), ["GET"])
                else:
                    methods = [kind.upper()]
                out.setdefault(deco.args[0].value, set()).update(methods)
        return out

    def handler_keys(self, path: str, function: str) -> set:
        """The string keys of the dict literals in a function (what a handler answers)."""
        keys = set()
        for node in ast.walk(self.tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
                keys |= dict_keys(node)
        assert keys, f"SGLang {self.version}: {path} has no {function}() building a dict"
        return keys


def dict_keys(node) -> set:
    return {k.value for d in ast.walk(node) if isinstance(d, ast.Dict) for k in d.keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def meta_info_keys(src: Source) -> set:
    """Keys the tokenizer manager puts into meta_info: `meta_info = {...}`, `meta_info[k] = v`,
    `meta_info.update({...})`."""
    keys = set()
    for node in ast.walk(src.tree(SRT + "managers/tokenizer_manager.py")):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "meta_info" and isinstance(node.value, ast.Dict):
                    keys |= dict_keys(node.value)
                if (isinstance(target, ast.Subscript) and ast.unparse(target.value) == "meta_info"
                        and isinstance(target.slice, ast.Constant)):
                    keys.add(target.slice.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                and ast.unparse(node.func.value) == "meta_info"):
            keys |= dict_keys(node)
    return keys


def output_keys(src: Source) -> set:
    """Keys of the output dicts that carry `meta_info` (one /generate output each)."""
    keys = set()
    for node in ast.walk(src.tree(SRT + "managers/tokenizer_manager.py")):
        if isinstance(node, ast.Dict):
            own = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if "meta_info" in own:
                keys |= own
    return keys


def cli_flags(src: Source) -> dict:
    """ServerArgs' command-line flags -> whether the field is a bool (a switch): fields
    written `name: A[type, help-or-Arg(...)]` (flag `--name-with-dashes`, or `cli_name`, plus
    `aliases`) and explicit `add_argument("--flag", ...)` calls."""
    files = [n for n in src.names if n == SRT + "server_args.py" or
             (n.startswith(SRT + "arg_groups/") and n.endswith(".py"))]
    flags: dict = {}
    for path in files:
        for node in ast.walk(src.tree(path)):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(node.annotation, ast.Subscript) and ast.unparse(node.annotation.value) == "A"):
                parts = node.annotation.slice.elts if isinstance(node.annotation.slice, ast.Tuple) else []
                if not parts:
                    continue
                is_bool = ast.unparse(parts[0]) in ("bool", "Optional[bool]")
                names, no_cli = ["--" + node.target.id.replace("_", "-")], False
                for call in (p for p in parts[1:] if isinstance(p, ast.Call)):
                    for kw in call.keywords:
                        if kw.arg == "cli_name":
                            names[0] = ast.literal_eval(kw.value)
                        elif kw.arg == "aliases":
                            names += ast.literal_eval(kw.value)
                        elif kw.arg == "no_cli":
                            no_cli = ast.literal_eval(kw.value)
                if not no_cli:
                    flags.update({n: is_bool for n in names})
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                store_true = any(kw.arg == "action" and isinstance(kw.value, ast.Constant)
                                 and kw.value.value in ("store_true", "store_false") for kw in node.keywords)
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                        flags.setdefault(arg.value, store_true)
    return flags


@pytest.fixture(scope="module", params=SUPPORTED_VERSIONS)
def src(request):
    return Source(request.param)


def missing(src: Source, struct: str, wanted, have) -> list:
    return [f"SGLang {src.version}: {struct} has no field {name!r}" for name in wanted if name not in have]


def test_every_route_the_client_calls_exists_with_its_method(src):
    routes = src.routes()
    has_session = _version(src.version) >= _version(SESSION_SINCE)
    calls = {**{r: "POST" for r in SGLANG_REQUESTS}, **SGLANG_BODYLESS}
    errors = []
    for route, method in calls.items():
        if route in SESSION_ROUTES and not has_session:
            continue
        if method not in routes.get(route, ()):
            errors.append(f"SGLang {src.version}: no {method} {route} (it has {sorted(routes.get(route, ()))})")
    # the session exists exactly from SESSION_SINCE on: the client's version rule is right
    errors += [f"SGLang {src.version}: {r} {'missing' if has_session else 'present before ' + SESSION_SINCE}"
               for r in SESSION_ROUTES if (r in routes) != has_session]
    assert not errors, "\n".join(errors)


def test_every_field_the_client_sends_is_in_sglangs_request_structs(src):
    io_struct = SRT + "managers/io_struct.py"
    has_session = _version(src.version) >= _version(SESSION_SINCE)
    errors = []
    for route, (struct, sent) in SGLANG_REQUESTS.items():
        if route in SESSION_ROUTES and not has_session:
            continue
        errors += missing(src, struct, sent, src.fields(io_struct, struct))
    sampling = src.fields(SRT + "sampling/sampling_params.py", "SamplingParams")
    errors += missing(src, "SamplingParams", SAMPLING_FIELDS, sampling)
    contract = "sglang/api/v1/api_types.py"  # 0.5.23's schema gate in front of /generate
    if contract in src.names:
        errors += missing(src, "api.v1.GenerateRequest", SGLANG_REQUESTS["/generate"][1],
                          src.fields(contract, "GenerateRequest"))
        errors += missing(src, "api.v1.SamplingParams (unknown keys rejected)", SAMPLING_FIELDS,
                          src.fields(contract, "SamplingParams"))
    assert not errors, "\n".join(errors)


def test_every_response_key_the_client_reads_is_one_sglang_writes(src):
    errors = missing(src, "/generate output", OUTPUT_READ, output_keys(src))
    errors += missing(src, "meta_info", META_INFO_READ, meta_info_keys(src))
    reasons = set()
    for node in ast.walk(src.tree(SRT + "managers/schedule_batch.py")):
        if isinstance(node, ast.ClassDef) and node.name.startswith("FINISH"):
            reasons |= dict_keys(node)
    errors += missing(src, "finish_reason (schedule_batch FINISH_*.to_json)", FINISH_REASON_READ, reasons)
    http = SRT + "entrypoints/http_server.py"
    errors += missing(src, "/model_info answer", MODEL_INFO_READ, src.handler_keys(http, "model_info"))
    errors += missing(src, "/server_info answer", SERVER_INFO_READ, src.handler_keys(http, "server_info"))
    for handler in ("init_weights_update_group", "update_weights_from_distributed", "update_weights_from_tensor",
                    "destroy_weights_update_group"):
        errors += missing(src, f"/{handler} answer", UPDATE_ANSWER_READ, src.handler_keys(http, handler))
    assert not errors, "\n".join(errors)


def test_the_launchers_flags_are_sglang_server_arguments(src):
    cfg = load_config(overrides=["rollout.backend=sglang", "rollout.tp_size=2", "rollout.colocate=true",
                                 "rollout.api_key=k"]).rollout
    cmd = sglang_command(cfg, "/models/m", 30000, seed=1, dp_size=2, python="py")
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert "sglang/launch_server.py" in src.names
    flags = cli_flags(src)
    errors = []
    for i, token in enumerate(cmd):
        if not token.startswith("--"):
            continue
        switch = i + 1 == len(cmd) or cmd[i + 1].startswith("--")
        if token not in flags:
            errors.append(f"SGLang {src.version}: ServerArgs has no flag {token}")
        elif switch != flags[token]:
            errors.append(f"SGLang {src.version}: {token} is {'a switch' if flags[token] else 'a value flag'} "
                          f"in ServerArgs, the launcher passes it as {'a switch' if switch else 'a value flag'}")
    assert not errors, "\n".join(errors)


def test_the_checks_can_fail():
    """The parsers find what they look for (a renamed field would be reported, not missed)."""
    src = Source(SUPPORTED_VERSIONS[-1])
    assert missing(src, "UpdateWeightsFromDistributedReqInput", ["names", "nmaes"],
                   src.fields(SRT + "managers/io_struct.py", "UpdateWeightsFromDistributedReqInput")) == [
        f"SGLang {src.version}: UpdateWeightsFromDistributedReqInput has no field 'nmaes'"]
    assert {"--model-path", "--tp-size", "--port"} <= set(cli_flags(src)) and "--no-such-flag" not in cli_flags(src)
    assert "weight_version" in meta_info_keys(src) and "/generate" in src.routes()
