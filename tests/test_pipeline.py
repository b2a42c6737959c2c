"""The runner: profile checks, and the notebooks end to end on the smoke profile (CPU, no downloads)."""
import json

import pytest
import yaml

from helpers import assess, pipeline


def test_profile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known profiles: .*quick"):
        pipeline.load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: x\nparams: {}\nstages:\n  - params: {}\n")
    with pytest.raises(ValueError, match="stage 1 needs a 'notebook'"):
        pipeline.load_profile(bad)
    bad.write_text("run: x\nstages: []\n")
    with pytest.raises(ValueError, match="'params' must be a dict"):
        pipeline.load_profile(bad)
    bad.write_text("run: x\nparams: {}\nstages:\n  - notebook: 01_teacher_logits\n    parms: {}\n")
    with pytest.raises(ValueError, match=r"stage 1 \(01_teacher_logits\): unknown field 'parms' \(did you mean 'params'\?\)"):
        pipeline.load_profile(bad)
    bad.write_text("run: x\nparams: {n_test: 1\nstages: []\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        pipeline.load_profile(bad)
    with pytest.raises(ValueError, match="key=value"):
        pipeline.parse_set(["n_test"])
    assert pipeline.parse_set(["n_test=8", "data_dir=null", "student=a/b", "training={lr: 2e-5}"]) == {
        "n_test": 8, "data_dir": None, "student": "a/b", "training": {"lr": 2e-5}}


def test_runs_started_at_once_install_the_kernel_once(tmp_path, monkeypatch):
    """The kernel's installer replaces its folder: two runs starting together (two test workers)
    must not both install, or one copies into a folder the other is replacing."""
    import sys
    import threading
    import time

    import ipykernel.kernelspec

    installed, active, most = [], [], [0]

    def install(**kw):
        active.append(1)
        most[0] = max(most[0], len(active))
        time.sleep(0.3)  # long enough for the other run to arrive
        installed.append(kw["kernel_name"])
        active.pop()

    monkeypatch.setattr(pipeline, "_kernel_is_ours", lambda: bool(installed))
    monkeypatch.setattr(ipykernel.kernelspec, "install", install)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # the lock lives in the environment's share/jupyter
    runs = [threading.Thread(target=pipeline.ensure_kernel) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert installed == [pipeline.KERNEL] and most[0] == 1


def test_unknown_stage_and_missing_notebook(tmp_path):
    with pytest.raises(ValueError, match="no such stage"):
        pipeline.run_profile("smoke", root=tmp_path, only=["04_nothing"])
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"run": "p", "params": {}, "stages": [{"notebook": "99_missing"}]}))
    with pytest.raises(FileNotFoundError, match="99_missing.ipynb"):
        pipeline.run_profile(prof, root=tmp_path)


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    """Every notebook through the runner: teacher stores, two variants trained, all rows assessed, Co-LLM."""
    root = tmp_path / "proj"
    assert pipeline.main(["--profile", "smoke", "--root", str(root)]) == 0
    logs, results = root / "logs" / "smoke", root / "results" / "smoke"
    md = (logs / "accuracy.md").read_text()
    assert "| Experiment | Accuracy | # Questions Correct | n | 95% CI |" in md
    for row in ("no-distillation", "fine-tuning", "gold-hint-kd"):
        assert f"| {row} |" in md and (logs / "per_question" / f"{row}.csv").is_file()
    assert "KD divergence (val)" in md
    assert "## Paired comparisons" in md and "| gold-hint-kd | no-distillation | 4 |" in md
    assert md.index("## Pre-registered comparison") < md.index("## Paired comparisons")
    assert "| gold-hint-kd vs no-distillation | 4 |" in md and "| gold-hint-kd vs fine-tuning | 4 |" in md
    assert "| gold-hint-kd | fine-tuning | 4 |" in md and (logs / "accuracy_pairs.csv").is_file()
    div = {line.split(",")[0]: line.split(",")[1:] for line in (logs / "kd_divergence.csv").read_text().splitlines()}
    assert div["experiment"] == ["base", "gold-hint"]
    # teacher = student and the base strategy shows the plain question: the control is the teacher itself
    assert float(div["no-distillation"][0]) < 0.01 < float(div["no-distillation"][1])
    assert (logs / "teacher.md").is_file()
    page = (logs / "report.html").read_text()  # the run's page, rebuilt after the last stage
    assert "accuracy.md" in page and "data:image/png" in page and "01_teacher_logits" in page
    assert json.loads((results / "stages" / "03_assess.json").read_text())["environment"]["versions"]["torch"]
    for strategy in ("base", "gold-hint"):
        for split in ("train", "validation"):
            assert (results / "teacher" / strategy / split / "manifest.json").is_file()
    for variant in ("fine-tuning", "gold-hint-kd"):
        assert (results / "adapters" / variant / "adapter_model.safetensors").is_file()
        assert (results / "figures" / f"loss_{variant}.png").is_file()
    for png in ("accuracy.png", "comparison.png"):
        assert (results / png).read_bytes()[:4] == b"\x89PNG"
    # Co-LLM: every row, the validation curve and the pictures
    co = (logs / "co_llm.md").read_text()
    for row in ("base alone", "assistant alone", "Co-LLM (learned)", "random deferral", "weak-supervision head"):
        assert f"| {row} |" in co
    assert "prompted copy of the same model" in co
    assert "| Co-LLM (learned) | base alone | 4 |" in co and "| Co-LLM (learned) | assistant alone | 4 |" in co
    curve = (logs / "co_llm" / "validation_curve.csv").read_text().splitlines()
    assert curve[0].startswith("target,eta,eta_logit,deferral,accuracy") and len(curve) == 4
    for png in ("accuracy_vs_deferral.png", "provenance.png", "deferral_breakdown.png"):
        assert (results / "co_llm" / png).read_bytes()[:4] == b"\x89PNG"
    # fusion across tokenizers: the student's own tokenizer (SmolLM2) and Gemma 3's
    fu = (logs / "fusion.md").read_text()
    for row in ("no-distillation", "kd-gemma3", "minCE"):
        assert f"| {row} |" in fu
    assert "NLL per byte (test refs)" in fu and "KL to gemma3-270m (val)" in fu and "KL to smollm2-135m-instruct (val)" in fu
    stats = {line.split(" | ")[0].strip("| "): line for line in fu.splitlines() if line.startswith("| gemma3-270m |")
             or line.startswith("| smollm2-135m-instruct | 1.000")}
    assert set(stats) == {"gemma3-270m", "smollm2-135m-instruct"}  # the student's own tokenizer aligns 1:1
    executed = json.loads((results / "notebooks" / "03_assess.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])

    # a second run of the same profile reuses every finished stage
    assert pipeline.run_profile("smoke", root=root) == []
    # a filled-in overrides file is an input of the assessment, and of nothing else
    import pandas as pd

    def fingerprints(overrides=None):
        plan = pipeline.stage_plan(pipeline.load_profile("smoke"), root, overrides)
        return {stage["name"]: pipeline.stage_fingerprint(stage, root, "smoke") for stage in plan}

    before = fingerprints()
    review = pd.read_csv(logs / "manual_review.csv", dtype=str, keep_default_na=False)
    assert list(review.columns)[-1] == "answer"
    # an answer written for one response of the untrained row (the short responses here need no review)
    first = pd.read_csv(logs / "per_question" / "no-distillation.csv", dtype=str, keep_default_na=False).iloc[0]
    pd.DataFrame([{"experiment": "no-distillation", "id": first["id"], "response_sha": assess.response_sha(first["response"]),
                   "answer": "-1"}]).to_csv(logs / "overrides.csv", index=False)
    after = fingerprints()
    assert [name for name in before if before[name] != after[name]] == ["03_assess"]
    # a changed variant changes that variant's training stage only, and the assessment
    changed = {"variants": {"fine-tuning": {"loss": "ce", "lr": 0.05},
                            "gold-hint-kd": {"strategy": "gold-hint", "loss": "reverse_kl", "T": 2.0, "alpha": 0.5}}}
    retrain = fingerprints(changed)
    assert [name for name in after if after[name] != retrain[name]] == ["02_distill-fine-tuning", "03_assess"]
    # the filled-in overrides file reruns the assessment alone, which applies it
    assert pipeline.run_profile("smoke", root=root) == ["03_assess"]
    assert "1 manual override(s) applied" in (logs / "accuracy.md").read_text()


@pytest.mark.slow
def test_failing_stage_names_notebook_and_cell(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    code = pipeline.main(["--profile", "smoke", "--root", str(tmp_path), "--set", f"teacher={missing}"])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.split("\n") if "error:" in line]  # (papermill's progress bar shares stderr)
    assert len(errors) == 1 and err.endswith(errors[0] + "\n")
    err = errors[0][errors[0].index("error:"):]
    assert err.startswith("error: stage '01_teacher_logits' failed in cell")
    assert f"could not load model '{missing}'" in err
    failed = tmp_path / "results" / "smoke" / "notebooks" / "01_teacher_logits.failed.ipynb"
    assert failed.is_file() and f"[traceback in {failed}]" in err
    assert "Traceback" in failed.read_text() or "ValueError" in failed.read_text()
    assert not (tmp_path / "results" / "smoke" / "notebooks" / "01_teacher_logits.ipynb").exists()
    assert not (tmp_path / "results" / "smoke" / "stages").exists()  # nothing recorded as done
    assert not (tmp_path / "results" / "smoke" / ".lock").exists()  # the lock goes with the run


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    results = tmp_path / "results" / "smoke"
    with pipeline.run_lock(results) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert pipeline.main(["--profile", "smoke", "--root", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{results} is in use by another run (pid {os.getpid()}" in err
        assert f"delete {lock}" in err
        with pytest.raises(pipeline.RunLocked):
            with pipeline.run_lock(results):
                pass
        assert lock.is_file()  # the refused run leaves the holder's lock alone
    assert not lock.exists()
    # a lock whose process is gone (killed run) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    with pipeline.run_lock(results):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().out and not lock.exists()
    # the lock is released when the run fails, too
    with pytest.raises(RuntimeError):
        with pipeline.run_lock(results):
            raise RuntimeError("stage failed")
    assert not lock.exists()


def test_each_runs_one_instance_per_variant(tmp_path):
    st = {"name": "02_distill", "each": {"variant": "variants"}}
    got = pipeline._instances(st, {"variants": {"a": {"loss": "ce"}, "b": None}})
    assert got == [("02_distill-a", {"variant": "a", "variant_spec": {"loss": "ce"}}),
                   ("02_distill-b", {"variant": "b", "variant_spec": {}})]
    assert pipeline._instances({"name": "x", "each": {"s": "items"}}, {"items": ["p", "q"]})[1] == ("x-q", {"s": "q", "s_spec": {}})
    with pytest.raises(ValueError, match="non-empty mapping or list in params.variants"):
        pipeline._instances(st, {"variants": {}})
    with pytest.raises(ValueError, match="one 'param: collection' pair"):
        pipeline._instances({"name": "x", "each": "variants"}, {})
    plan = pipeline.stage_plan(pipeline.load_profile("quick"), tmp_path)
    assert [s["name"] for s in plan if s["name"].startswith("02_")] == [
        "02_distill-fine-tuning", "02_distill-base-kd", "02_distill-reference-kd"]
    # a variant's stage sees only its own spec, so editing one variant leaves the others done
    assert all("variants" not in s["params"] for s in plan if s["name"].startswith("02_"))


def test_study_profile_is_sized_for_a_real_comparison(tmp_path):
    """All seven rows, at least 500 test problems, three training seeds, both controls present."""
    cfg = pipeline.load_profile("study")
    p = cfg["params"]
    assert p["n_test"] >= 500 and len(p["seeds"]) == 3
    assert set(p["variants"]) == {"fine-tuning", "base-kd", "teacher-kd", "ground-truth-kd", "confidence-kd",
                                  "gold-hint-kd"}  # + the no-distillation row of notebook 03
    assert p["teacher"] != p["student"] and p["teacher_max_new_tokens"] >= 512
    plan = pipeline.stage_plan(cfg, tmp_path)
    assess_stage = next(s for s in plan if s["name"] == "03_assess")
    assert assess_stage["params"]["seeds"] == [0, 1, 2]
    assert all(s["params"]["seeds"] == [0, 1, 2] for s in plan if s["name"].startswith("02_distill-"))
