"""SGLang's side of the colocated weight update, run from the real wheel's own source.

SGLang cannot be imported here (its utils pull in triton, zmq, PIL...), so the pieces that
decode a `/update_weights_from_tensor` payload are taken from the wheel as they are:
`sglang/srt/weight_sync/tensor_bucket.py` (plain torch) becomes the module of that name, and
`MultiprocessingSerializer`, `SafeUnpickler` (and its helper) are cut out of
`sglang/srt/utils/common.py` with `ast` and executed unchanged.

    python tests/sglang_side.py decode WHEEL ENTRIES.json OUT.json   ({"sglang": [...], "ours": [...]})
    python tests/sglang_side.py serve WHEEL VERSION PORT_FILE      (an HTTP stand-in, see `serve`)

Run only in a process of its own: it registers stub `sglang` packages in sys.modules.
"""
from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import json
import pickle
import sys
import types
import zipfile
from multiprocessing.reduction import ForkingPickler
from typing import Any, List, Union

import torch

SUPPORTED = ("0.5.15.post1", "0.5.19", "0.5.23")


def wheel_source(wheel: str, path: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(path).decode()


def load_sglang(wheel: str):
    """(deserialize, tensor_bucket module): SGLang's own code from `wheel`."""
    for name in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
        mod = sys.modules.setdefault(name, types.ModuleType(name))
        mod.__path__ = []
    tb = types.ModuleType("sglang.srt.weight_sync.tensor_bucket")
    sys.modules[tb.__name__] = tb  # before its body runs: @dataclass looks its module up
    exec(compile(wheel_source(wheel, "sglang/srt/weight_sync/tensor_bucket.py"), "tensor_bucket.py", "exec"),
         tb.__dict__)
    common = wheel_source(wheel, "sglang/srt/utils/common.py")
    wanted = {"SafeUnpickler", "MultiprocessingSerializer", "_safe_load_torch_storage"}
    parts = [ast.get_source_segment(common, node) for node in ast.parse(common).body
             if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in wanted]
    ns: dict[str, Any] = {"__name__": "sglang_common_from_wheel", "pickle": pickle, "io": io, "torch": torch,
                          "ForkingPickler": ForkingPickler, "pybase64": base64, "binascii": binascii,
                          "List": List, "Union": Union}
    exec(compile("\n\n\n".join(parts), "common.py", "exec"), ns)
    return ns["MultiprocessingSerializer"].deserialize, tb


def rebuild(deserialize, tb, entry: str, load_format):
    """One TP rank's entry to (name, tensor), the way SGLang's weight updater does it."""
    data = deserialize(entry)
    if load_format != "flattened_bucket":
        return list(data)
    meta = data["metadata"]
    if not all(isinstance(m, tb.FlattenedTensorMetadata) for m in meta):
        raise TypeError(f"metadata are not SGLang's FlattenedTensorMetadata: {[type(m) for m in meta][:3]}")
    converted = [tb.FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                            end_idx=m.end_idx, numel=m.numel) for m in meta]
    bucket = tb.FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=converted)
    return bucket.reconstruct_tensors()


def digest(named) -> dict:
    return {n: {"dtype": str(t.dtype), "shape": list(t.shape),
                "sha256": hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                .hexdigest()} for n, t in named}


def serve(wheel: str, version: str, port_file: str) -> None:
    """SGLang's HTTP side of a weight sync, as far as the trainer sees it: the session routes
    (0.5.21 and later; 404 before), pause/flush/continue, and /update_weights_from_tensor
    decoding every TP rank's entry with SGLang's code (each must give the same tensors).
    GET /standin/weights answers what arrived: name -> dtype, shape, sha256."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    deserialize, tb = load_sglang(wheel)
    has_session = tuple(int(x) for x in version.split(".")[:3] if x.isdigit()) >= (0, 5, 21)
    state: dict[str, Any] = {"session": False, "weights": {}, "entries": 0, "version": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            routes = {"/health": {}, "/health_generate": {}, "/model_info": {"model_path": "standin"},
                      "/server_info": {"version": version},
                      "/standin/weights": {"weights": state["weights"], "entries": state["entries"],
                                           "weight_version": state["version"]}}
            if self.path in routes:
                return self._send(200, routes[self.path])
            self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path in ("/begin_weight_update", "/end_weight_update") and not has_session:
                return self._send(404, {"detail": "Not Found"})
            if self.path == "/begin_weight_update":
                ok = not state["session"]
                state["session"] = True
                return self._send(200 if ok else 400, {"success": ok, "message": "" if ok else "already open"})
            if self.path == "/end_weight_update":
                ok, state["session"] = state["session"], False
                return self._send(200 if ok else 400, {"success": ok, "message": "" if ok else "no session"})
            if self.path == "/update_weight_version":
                state["version"] = body.get("new_version")
            if self.path == "/update_weights_from_tensor":
                if has_session and not state["session"]:
                    return self._send(400, {"success": False, "message": "no weight-update session is open"})
                try:
                    decoded = [digest(rebuild(deserialize, tb, e, body.get("load_format")))
                               for e in body["serialized_named_tensors"]]
                except Exception as err:
                    return self._send(400, {"success": False, "message": f"{type(err).__name__}: {err}"})
                if any(d != decoded[0] for d in decoded):
                    return self._send(400, {"success": False, "message": "TP ranks' entries differ"})
                state["weights"].update(decoded[0])
                state["entries"] += len(decoded)
            self._send(200, {"success": True, "message": ""})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os

    os.replace(port_file + ".tmp", port_file)
    srv.serve_forever()


def main(argv: list[str]) -> int:
    if argv[0] == "decode":
        wheel, entries_file, out_file = argv[1:4]
        deserialize, tb = load_sglang(wheel)
        spec = json.loads(open(entries_file).read())
        out = {"sglang": [digest(rebuild(deserialize, tb, e, spec["load_format"])) for e in spec["sglang"]]}
        from at_rollout.transports import cuda_ipc

        out["ours"] = [digest(cuda_ipc.decode(e)) for e in spec["ours"]]  # a handle opens once: entries of its own
        with open(out_file, "w") as f:
            json.dump(out, f)
        return 0
    if argv[0] == "serve":
        serve(*argv[1:4])
        return 0
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
