"""The runner: profile checks, and the notebooks end to end on the smoke profile (CPU, no downloads)."""
import json
import shutil

import pytest
import yaml

from helpers import pipeline


def test_profiles_in_configs_are_valid():
    for name in ("smoke", "quick", "full"):
        cfg = pipeline.load_profile(name)
        assert cfg["run"] == name and cfg["stages"]


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
    with pytest.raises(ValueError, match="key=value"):
        pipeline.parse_set(["n_test"])
    assert pipeline.parse_set(["n_test=8", "data_dir=null", "student=a/b"]) == {
        "n_test": 8, "data_dir": None, "student": "a/b"}


def test_unknown_stage_and_missing_notebook(tmp_path):
    with pytest.raises(ValueError, match="no such stage"):
        pipeline.run_profile("smoke", root=tmp_path, only=["04_nothing"])
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"run": "p", "params": {}, "stages": [{"notebook": "99_missing"}]}))
    with pytest.raises(FileNotFoundError, match="99_missing.ipynb"):
        pipeline.run_profile(prof, root=tmp_path)


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    root = tmp_path / "proj"
    assert pipeline.main(["--profile", "smoke", "--root", str(root)]) == 0
    logs, results = root / "logs" / "smoke", root / "results" / "smoke"
    md = (logs / "accuracy.md").read_text()
    assert "| Experiment | Accuracy | # Questions Correct | n | 95% CI |" in md
    assert "| no-distillation |" in md and "| 4 |" in md
    assert (logs / "per_question" / "no-distillation.csv").is_file()
    assert (results / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    executed = json.loads((results / "notebooks" / "03_assess.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])

    # a second run of the same profile reuses the finished stage
    assert pipeline.run_profile("smoke", root=root) == []
    # a filled-in overrides file is an input of the stage: the stage runs again and applies it
    review = (logs / "manual_review.csv").read_text().splitlines()
    header, first = review[0].split(","), review[1]
    assert header[-1] == "answer"
    (logs / "overrides.csv").write_text(review[0] + "\n" + first + "-1\n")
    assert pipeline.run_profile("smoke", root=root) == ["03_assess"]
    assert "1 manual override(s) applied" in (logs / "accuracy.md").read_text()
    # changed parameters re-run it; the generation cache makes that cheap
    assert pipeline.run_profile("smoke", root=root, overrides={"extract_mode": "seed"}) == ["03_assess"]
    assert "extraction mode 'seed'" in (logs / "accuracy.md").read_text()


@pytest.mark.slow
def test_failing_stage_names_notebook_and_cell(tmp_path, capsys):
    code = pipeline.main(["--profile", "smoke", "--root", str(tmp_path), "--set", "data_source=gsm9k"])
    err = capsys.readouterr().err
    assert code == 1
    assert "stage '03_assess' failed in cell" in err and "unknown data source 'gsm9k'" in err
    failed = tmp_path / "results" / "smoke" / "notebooks" / "03_assess.failed.ipynb"
    assert failed.is_file() and str(failed) in err
    assert not (tmp_path / "results" / "smoke" / "notebooks" / "03_assess.ipynb").exists()
    assert not (tmp_path / "logs" / "smoke" / "accuracy.md").exists()
