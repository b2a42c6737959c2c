"""What an engine needs before it can open, said in one line: a CUDA GPU, an optional package."""
from __future__ import annotations


def need_cuda(backend: str, extra: str) -> None:
    """One clear line instead of a compile error deep inside a CUDA-only package."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"teacher_backend {backend!r} needs a CUDA GPU, and this machine has none "
                           f"(torch.cuda.is_available() is False); use 'transformers' or 'llama_cpp' here, "
                           f"or run on a GPU machine after `pip install -e .[{extra}]`")


def missing_package(backend: str, package: str, extra: str, err: ImportError) -> RuntimeError:
    return RuntimeError(f"teacher_backend {backend!r} needs the package {package!r}, which is not installed "
                        f"({err}); install it with `pip install -e .[{extra}]`")
