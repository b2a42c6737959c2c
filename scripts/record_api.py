"""Record the interface a CUDA-only teacher engine relies on, read from the library's wheel.

    python scripts/record_api.py WHEEL [--out FILE] [--check]

The wheel (a zip, e.g. from ``pip download exllamav2==0.3.2 --no-deps``) is read as text with
Python's ``ast``: nothing in it is installed or imported, so libraries that compile CUDA code on
import can be recorded on any machine. What is recorded per library is listed in ``SPECS`` below
(the calls, attributes and keys the engine in ``helpers/backends`` uses); the result goes to
``tests/data/<name>_<version>_api.json`` unless ``--out`` says otherwise, and the contract tests in
``tests/test_backends.py`` build their stand-in libraries from it. ``--check`` compares with the file
already there instead of writing it (exit status 1 when they differ).

Kinds of entry:

- ``params``: the parameter names of a function or method (``Class.method``), ``self``/``cls`` left
  out, in their order (positional first, then keyword-only);
- ``defaults``: {parameter: its default, as source text} for those that have one;
- ``takes_kwargs``: whether it also takes ``**kwargs``;
- ``fields``: the names annotated in a class body (dataclasses, TypedDicts, pydantic models);
- ``attributes``: those and every ``self.name`` a method of the class assigns;
- ``exports``: the names a package's ``__init__.py`` imports (a ``*`` import is left out);
- ``params_keys``: the string keys read from or written to a dict named ``params`` in the
  functions named (``path:Class.method`` or ``path:function``);
- ``constant``: a module-level constant's value (a literal).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def signature(path: str, qualname: str) -> list[tuple]:
    """The three entries of a call: its parameters, their defaults, whether it takes ``**kwargs``."""
    return [(qualname, "params", path, qualname), (f"{qualname} defaults", "defaults", path, qualname),
            (f"{qualname} takes **kwargs", "takes_kwargs", path, qualname)]

SPECS = {
    "vllm": {
        "files": {
            "SamplingParams": "vllm/sampling_params.py",
            "LLM": "vllm/entrypoints/llm.py",
            "EngineArgs": "vllm/engine/arg_utils.py",
            "TokensPrompt": "vllm/inputs/llm.py",
            "CompletionOutput/RequestOutput": "vllm/outputs.py",
            "Logprob": "vllm/logprobs.py",
            "CompletionRequest": "vllm/entrypoints/openai/completion/protocol.py",
        },
        "entries": [
            ("SamplingParams", "fields", "vllm/sampling_params.py", "SamplingParams"),
            ("LLM.__init__", "params", "vllm/entrypoints/llm.py", "LLM.__init__"),
            ("LLM.__init__ takes **kwargs (EngineArgs)", "takes_kwargs", "vllm/entrypoints/llm.py", "LLM.__init__"),
            ("EngineArgs", "fields", "vllm/engine/arg_utils.py", "EngineArgs"),
            ("LLM.generate", "params", "vllm/entrypoints/llm.py", "LLM.generate"),
            ("TokensPrompt", "fields", "vllm/inputs/llm.py", "TokensPrompt"),
            ("CompletionOutput", "fields", "vllm/outputs.py", "CompletionOutput"),
            ("RequestOutput", "params", "vllm/outputs.py", "RequestOutput.__init__"),
            ("Logprob", "fields", "vllm/logprobs.py", "Logprob"),
            ("CompletionRequest", "fields", "vllm/entrypoints/openai/completion/protocol.py", "CompletionRequest"),
        ],
    },
    "exllamav2": {
        "files": {
            "exports": "exllamav2/__init__.py",
            "ExLlamaV2Config": "exllamav2/config.py",
            "ExLlamaV2": "exllamav2/model.py",
            "ExLlamaV2CacheBase/ExLlamaV2Cache/ExLlamaV2Cache_Q8/Q6/Q4": "exllamav2/cache.py",
            "ExLlamaV2Linear (the head)": "exllamav2/linear.py",
        },
        "entries": [
            ("exports", "exports", "exllamav2/__init__.py", None),
            *signature("exllamav2/config.py", "ExLlamaV2Config.__init__"),
            ("ExLlamaV2Config attributes", "attributes", "exllamav2/config.py", "ExLlamaV2Config"),
            *signature("exllamav2/config.py", "ExLlamaV2Config.arch_compat_overrides"),
            *signature("exllamav2/model.py", "ExLlamaV2.__init__"),
            *signature("exllamav2/model.py", "ExLlamaV2.load"),
            *signature("exllamav2/model.py", "ExLlamaV2.load_autosplit"),
            *signature("exllamav2/model.py", "ExLlamaV2.forward"),
            *signature("exllamav2/model.py", "ExLlamaV2.unload"),
            ("ExLlamaV2CacheBase attributes", "attributes", "exllamav2/cache.py", "ExLlamaV2CacheBase"),
            *signature("exllamav2/cache.py", "ExLlamaV2CacheBase.reset"),
            *signature("exllamav2/cache.py", "ExLlamaV2Cache.__init__"),
            *signature("exllamav2/cache.py", "ExLlamaV2Cache_Q8.__init__"),
            *signature("exllamav2/cache.py", "ExLlamaV2Cache_Q6.__init__"),
            *signature("exllamav2/cache.py", "ExLlamaV2Cache_Q4.__init__"),
            ("ExLlamaV2Linear.__init__ defaults", "defaults", "exllamav2/linear.py", "ExLlamaV2Linear.__init__"),
        ],
    },
    "exllamav3": {
        "files": {
            "exports": "exllamav3/__init__.py",
            "Config": "exllamav3/model/config.py",
            "Model": "exllamav3/model/model.py",
            "Cache": "exllamav3/cache/cache.py",
            "CacheLayer_fp16": "exllamav3/cache/fp16.py",
            "CacheLayer_quant": "exllamav3/cache/quant.py",
            "Linear (the head)": "exllamav3/modules/linear.py",
            "PAGE_SIZE": "exllamav3/constants.py",
            "Model.forward params keys": "exllamav3/modules/attn.py (prepare_for_attn, prepare_flash_attn), "
                                         "exllamav3/model/model_ls.py (forward_ls), "
                                         "exllamav3/cache/recurrent_util.py (prepare_for_recurrence)",
        },
        "entries": [
            ("exports", "exports", "exllamav3/__init__.py", None),
            *signature("exllamav3/model/config.py", "Config.from_directory"),
            ("Config attributes", "attributes", "exllamav3/model/config.py", "Config"),
            *signature("exllamav3/model/model.py", "Model.from_config"),
            *signature("exllamav3/model/model.py", "Model.load"),
            *signature("exllamav3/model/model.py", "Model.load_gen"),
            *signature("exllamav3/model/model.py", "Model.forward"),
            *signature("exllamav3/model/model.py", "Model.prefill"),
            *signature("exllamav3/model/model.py", "Model.unload"),
            ("Model.forward params keys", "params_keys", None,
             ["exllamav3/modules/attn.py:prepare_for_attn", "exllamav3/modules/attn.py:prepare_flash_attn",
              "exllamav3/model/model_ls.py:Model_LSMixin.forward_ls",
              "exllamav3/cache/recurrent_util.py:prepare_for_recurrence"]),
            *signature("exllamav3/cache/cache.py", "Cache.__init__"),
            ("Cache attributes", "attributes", "exllamav3/cache/cache.py", "Cache"),
            *signature("exllamav3/cache/cache.py", "Cache.release_state"),
            *signature("exllamav3/cache/fp16.py", "CacheLayer_fp16.__init__"),
            *signature("exllamav3/cache/quant.py", "CacheLayer_quant.__init__"),
            ("Linear.__init__ defaults", "defaults", "exllamav3/modules/linear.py", "Linear.__init__"),
            ("PAGE_SIZE", "constant", "exllamav3/constants.py", "PAGE_SIZE"),
        ],
    },
}


class Wheel:
    def __init__(self, path: str):
        self.path = Path(path)
        self.zip = zipfile.ZipFile(path)
        meta = next(n for n in self.zip.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = self.zip.read(meta).decode()
        self.name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
        self.version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.zip.read(path), filename=path)
        return self._trees[path]


def _find(tree: ast.Module, qualname: str):
    """The class or function ``qualname`` (``Class``, ``function`` or ``Class.method``) defined at
    the top of ``tree`` (a method directly in its class body)."""
    scope = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"{qualname} not found ({part})")
        scope = node.body
    return node


def _params(fn) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]


def _defaults(fn) -> dict[str, str]:
    a = fn.args
    positional = a.posonlyargs + a.args
    out = {p.arg: ast.unparse(d) for p, d in zip(positional[len(positional) - len(a.defaults):], a.defaults)}
    out.update({p.arg: ast.unparse(d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    return out


def _fields(cls: ast.ClassDef) -> list[str]:
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def _attributes(cls: ast.ClassDef) -> list[str]:
    names = _fields(cls)
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for e in ast.walk(t):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self" \
                        and e.attr not in names:
                    names.append(e.attr)
    return names


def _exports(tree: ast.Module) -> list[str]:
    return [a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names if a.name != "*"]


def _params_keys(wheel: Wheel, where: list[str]) -> list[str]:
    keys = set()
    for item in where:
        path, qualname = item.split(":")
        for node in ast.walk(_find(wheel.tree(path), qualname)):
            key = None
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "params":
                key = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "params" \
                    and node.func.attr in ("get", "pop", "setdefault") and node.args:
                key = node.args[0]
            elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                    and isinstance(node.comparators[0], ast.Name) and node.comparators[0].id == "params":
                key = node.left
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.add(key.value)
    return sorted(keys)


def record(wheel: Wheel) -> dict:
    if wheel.name not in SPECS:
        raise SystemExit(f"no record is defined for {wheel.name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[wheel.name]
    out = {"version": wheel.version,
           "source": f"{wheel.path.name} from PyPI, read with ast by scripts/record_api.py (nothing imported)",
           "files": spec["files"]}
    for key, kind, path, target in spec["entries"]:
        if kind == "params_keys":
            out[key] = _params_keys(wheel, target)
            continue
        tree = wheel.tree(path)
        if kind == "exports":
            out[key] = _exports(tree)
        elif kind == "constant":
            node = next(n for n in tree.body if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == target for t in n.targets))
            out[key] = ast.literal_eval(node.value)
        else:
            node = _find(tree, target)
            out[key] = {"params": _params, "defaults": _defaults, "fields": _fields, "attributes": _attributes,
                        "takes_kwargs": lambda fn: fn.args.kwarg is not None}[kind](node)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel")
    parser.add_argument("--out", help="where to write (default: tests/data/<name>_<version>_api.json)")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    wheel = Wheel(args.wheel)
    out = Path(args.out) if args.out else ROOT / "tests" / "data" / f"{wheel.name}_{wheel.version}_api.json"
    text = json.dumps(record(wheel), indent=1) + "\n"
    if args.check:
        same = out.is_file() and json.loads(out.read_text()) == json.loads(text)
        print(f"{out}: {'matches' if same else 'differs from'} {wheel.path.name}")
        return 0 if same else 1
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
