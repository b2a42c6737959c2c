"""Distributed training on this machine: two processes under ``accelerate launch`` on the CPU (DDP
over gloo) train the same adapter as one process with the same global batch, through the real
command line (``python -m helpers.kd.distill``). accelerate's ``--cpu`` launcher starts a single
process unless MPI is installed, so the processes are started by its torchrun launcher
(``--multi_gpu``) with ``ACCELERATE_USE_CPU=1``, which keeps them on the CPU. Each process takes every second micro-batch, so a step of
two processes × batch 2 is one process's step of two micro-batches of 2 (``grad_accum: 2``); the
token weights make both the token mean over the whole step. Dropout is off: its random masks would
be drawn in another order."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import models
from helpers.data import load_splits
from helpers.kd import distill, teacher

SIZES = dict(n_train=8, n_validation=2, n_test=2, seed=0)
TRAINING = {"epochs": 1, "batch_size": 2, "lr": 0.05, "lora_dropout": 0.0, "max_length": 1024, "momentum": 0.0}


def _accelerate() -> list[str]:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the accelerate command is not installed next to this Python")
    return [exe]


@pytest.fixture(scope="module")
def profile(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    loaded = models.load_model(tiny_dir, dtype="fp32")
    splits = load_splits("gsm_symbolic", **SIZES)
    for split in ("train", "validation"):
        teacher.build_store(teacher.store_dir(root / "results" / "ddp", "base", split), splits[split],
                            teacher=tiny_dir, strategy="base", k=8, max_new_tokens=12, batch_size=4, shard_size=4,
                            loaded=loaded, progress=False)
    path = root / "ddp.yaml"
    path.write_text(yaml.safe_dump({"run": "ddp", "params": {
        "data_source": "gsm_symbolic", **SIZES, "teacher": tiny_dir, "student": tiny_dir, "strategies": ["base"],
        "dtype": "fp32", "training": TRAINING,
        "variants": {"two-processes": {"strategy": "base", "loss": "forward_kl"},
                     "one-process": {"strategy": "base", "loss": "forward_kl", "grad_accum": 2}}},
        "stages": [{"notebook": "02_distill", "each": {"variant": "variants"}}]}))
    return root, path


def _adapter(root, variant):
    out = root / "results" / "ddp" / "adapters" / variant
    return load_file(str(out / "adapter_model.safetensors")), distill.load_history(out)


def test_two_gloo_processes_train_the_adapter_of_one_process(profile):
    root, path = profile
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    run = subprocess.run(_accelerate() + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                          "--mixed_precision", "no", "--dynamo_backend", "no",
                                          "--main_process_port", "0",
                                          "-m", "helpers.kd.distill", "--profile", str(path),
                                          "--variant", "two-processes", "--root", str(root)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MULTI_CPU" in run.stdout and "2 processes" in run.stdout, run.stdout[-2000:]
    one = subprocess.run([sys.executable, "-m", "helpers.kd.distill", "--profile", str(path),
                          "--variant", "one-process", "--root", str(root)],
                         env={**env, "ACCELERATE_USE_CPU": "0"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    (w2, h2), (w1, h1) = _adapter(root, "two-processes"), _adapter(root, "one-process")
    assert h2["step"] == h1["step"] == [1, 2]  # 4 micro-batches of 2: two global steps either way
    assert len(h2["micro_loss"]) == 2 and len(h1["micro_loss"]) == 4  # the main process saw half of them
    assert w1.keys() == w2.keys()
    moved = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved < 1e-5, moved
    assert any(w1[k].abs().max() > 0 for k in w1 if "lora_B" in k)  # training moved the adapter
    torch.testing.assert_close(torch.tensor(h2["train_loss"]), torch.tensor(h1["train_loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(h2["val_loss"]), torch.tensor(h1["val_loss"]), rtol=1e-5, atol=1e-6)


def test_the_shipped_accelerate_configs_load_and_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from helpers.settings import PROJECT

    want = {"one-gpu": DistributedType.NO, "ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP}
    readme = (PROJECT / "README.md").read_text()
    for name, kind in want.items():
        path = PROJECT / "configs" / "accelerate" / f"{name}.yaml"
        assert load_config_from_file(str(path)).distributed_type == kind
        assert f"configs/accelerate/{name}.yaml" in readme  # each documented with its command
