"""The settings schema: every bad value is one line naming it, numbers are numbers everywhere."""
import ast

import papermill as pm
import pytest
import yaml

from helpers import pipeline, settings
from helpers.pipeline import PROJECT


def _check(tmp_path, *sets, profile="smoke"):
    return pipeline.main(["--profile", profile, "--root", str(tmp_path), "--check", "--set", *sets])


@pytest.mark.parametrize("assignment, message", [
    ("n_tset=2", "--set: unknown setting 'n_tset' (did you mean 'n_test'?)"),
    ("=2", "--set '=2': empty setting name before '='"),
    ("n_test=abc", "--set: n_test='abc': expected an integer ≥ 1"),
    ("n_test=2.5", "--set: n_test=2.5: expected an integer ≥ 1"),
    ("shard_size=0", "--set: shard_size=0: expected an integer ≥ 1"),
    ("n_train=-4", "--set: n_train=-4: expected an integer ≥ 1"),
    ("teacher_k=null", "--set: teacher_k=null: expected an integer ≥ 1"),
    ("teacher_top_p=1.5", "--set: teacher_top_p=1.5: expected a number in (0, 1]"),
    ("dtype=float64", "--set: dtype='float64': expected one of auto, bf16"),
    ("data_source=gsm9k", "--set: data_source='gsm9k': expected one of word_arith, gsm_symbolic, gsm_symbolic-2step, gsm8k, gsm8k-socratic"),
    ("training={lr: 0}", "--set: training: lr=0: expected a number > 0"),
    ("training={lr: -1e-3}", "--set: training: lr=-0.001: expected a number > 0"),
    ("training={T: 0}", "--set: training: T=0: expected a number > 0"),
    ("training={epoch: 2}", "--set: training: unknown training setting 'epoch' (did you mean 'epochs'?)"),
    ("variants={a: {strategy: base, loss: forward_kl, T: -1}}", "variant 'a': T=-1: expected a number > 0"),
    ("variants={a: {strategy: base, loss: jsd, beta: 1}}", "variant 'a': beta=1: expected a number in (0, 1)"),
    ("variants={a: {strategy: base, loss: jsd, beta: 0}}", "variant 'a': beta=0: expected a number in (0, 1)"),
    ("variants={a: {strategy: base, alpha: 1.5}}", "variant 'a': alpha=1.5: expected a number in [0, 1]"),
    ("variants={a: {strategy: base, loss: kl}}",
     "variant 'a': unknown loss 'kl'; valid losses: forward_kl, reverse_kl, jsd, tv, ce"),
    ("variants={a: {loss: reverse_kl}}", "variant 'a': loss 'reverse_kl' learns from teacher distributions: "
                                         "add 'strategy: <name>' (the profile's: base, gold-hint)"),
    ("variants={a: {strategy: teacher, loss: forward_kl}}",
     "variant 'a': strategy 'teacher' has no teacher store in this profile; the profile's strategies: base, gold-hint"),
    ("variants={a: {strategy: base, temprature: 2}}", "variant 'a': unknown setting 'temprature'"),
    ("variants={no-distillation: {loss: ce}}", "variant 'no-distillation': the name is taken"),
    ("strategies=[base, gold-hnt]", "unknown strategy 'gold-hnt' (did you mean 'gold-hint'?)"),
    ("results_dir=/tmp/x", "--set: 'results_dir' is set by the runner; leave it out"),
    ("run_name=a/b", "--set: run_name='a/b': expected a name of letters"),
    ("data_dir=/no/such/folder", "data_dir is for the gsm8k sources"),
    ("data_source=gsm8k|data_dir=/no/such/folder", "data_dir='/no/such/folder': no such folder"),
    ("collm_n_test=0", "--set: collm_n_test=0: expected an integer ≥ 1 or null"),
    ("training.lr=0", "--set: training: lr=0: expected a number > 0"),
    ("variants.nope.T=2", "--set variants.nope.T=...: 'variants.nope' is not a mapping of this profile; "
                          "it has fine-tuning, gold-hint-kd"),
    ("variants.gold-hint-kd.T=0", "variant 'gold-hint-kd': T=0: expected a number > 0"),
])
def test_bad_settings_are_one_line_naming_the_culprit(tmp_path, capsys, assignment, message):
    assert _check(tmp_path, *assignment.split("|")) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert captured.out == "" and not (tmp_path / "results").exists()


def test_settings_not_read_by_any_stage_are_refused(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"run": "p", "params": {"n_train": 2, "n_validation": 1, "n_test": 1,
                                                            "teacher": "t", "strategies": ["base"], "collm_lr": 0.1},
                                    "stages": [{"notebook": "01_teacher_logits"}]}))
    assert pipeline.main(["--profile", str(prof), "--root", str(tmp_path), "--check"]) == 1
    assert "'collm_lr' is not read by any stage of this profile (it is read by notebook 04)" in capsys.readouterr().err


def test_numbers_in_e_notation_are_numbers_everywhere(tmp_path, capsys):
    """YAML 1.1 reads 2e-5 and 1.0e6 as text; profiles, variant rows and --set read them as numbers."""
    assert settings.load_yaml("a: 2e-5\nb: 1e6\nc: 1.0e6\nd: 1.5\ne: 12\nf: 2e-5x\ng: .5e1") == {
        "a": 2e-5, "b": 1e6, "c": 1e6, "d": 1.5, "e": 12, "f": "2e-5x", "g": 5.0}
    prof = tmp_path / "p.yaml"
    prof.write_text((PROJECT / "configs" / "smoke.yaml").read_text()
                    .replace("training: {epochs: 1,", "training: {lr: 2e-5, epochs: 1,")
                    .replace("shard_size: 2", "shard_size: 2e0"))
    plan = pipeline.stage_plan(pipeline.load_profile(prof), tmp_path, pipeline.parse_set(["teacher_k=1.6e1"]))
    teacher = next(s for s in plan if s["name"] == "01_teacher_logits")["params"]
    assert teacher["teacher_k"] == 16 and isinstance(teacher["teacher_k"], int) and teacher["shard_size"] == 2
    distill = next(s for s in plan if s["name"] == "02_distill-gold-hint-kd")["params"]
    assert distill["training"]["lr"] == 2e-5 and isinstance(distill["training"]["lr"], float)
    plan = pipeline.stage_plan(pipeline.load_profile(prof), tmp_path, pipeline.parse_set([
        "variants={ft: {loss: ce, lr: 1.0e-3}, kd: {strategy: base, lr: '3e-4', T: 2}}"]))
    rows = next(s for s in plan if s["name"] == "03_assess")["params"]["variants"]
    assert rows == {"ft": {"loss": "ce", "lr": 1e-3}, "kd": {"strategy": "base", "lr": 3e-4, "T": 2.0}}
    assert next(s for s in plan if s["name"] == "02_distill-kd")["params"]["variant_spec"]["lr"] == 3e-4


def test_a_profile_with_lr_2e_5_trains_with_that_rate(tiny_dir, tmp_path):
    """End to end from the YAML text to the optimizer: the run's history records lr 2e-5."""
    from helpers.kd import distill

    cfg = settings.load_yaml("training: {lr: 2e-5, epochs: 1, batch_size: 2}\nvariants: {ft: {loss: ce}}")
    p = settings.check_params(cfg)
    out = distill.run_variant("ft", p["variants"]["ft"], student=tiny_dir, results_dir=tmp_path,
                              training=p["training"], n_train=2, n_validation=1, n_test=1, dtype="fp32",
                              progress=False)
    assert distill.load_history(out)["lr"][0] == 2e-5


def test_check_prints_the_resolved_settings_and_runs_nothing(tmp_path, capsys):
    assert _check(tmp_path, "n_test=8", "training.lr=1e-3", "variants.gold-hint-kd.T=4") == 0
    out = capsys.readouterr().out
    assert "all settings are valid" in out and "  n_test: 8" in out
    assert "02_distill-gold-hint-kd" in out and "variant_spec: {T: 4.0, alpha: 0.5, loss: reverse_kl, strategy: gold-hint}" in out
    assert "training: {batch_size: 2, epochs: 1, lr: 0.001, max_length: 160}" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_every_notebook_parameter_is_declared_and_its_default_is_valid():
    declared: dict[str, set] = {}
    for nb in sorted((PROJECT / "notebooks").glob("*.ipynb")):
        params = pm.inspect_notebook(str(nb))
        for name, info in params.items():
            assert name in settings.PARAMS, f"{nb.name}: parameter {name!r} is not declared in helpers.settings"
            declared.setdefault(name, set()).add(nb.name[:2])
            setting = settings.PARAMS[name]
            if setting.runner or name in ("data_dir",):
                continue
            default = ast.literal_eval(info["default"])
            settings.check_value(setting, default, f"{nb.name}: ")  # the notebook's own default is allowed
    for name, setting in settings.PARAMS.items():
        assert set(setting.read_by) == declared.get(name, set()), f"{name}: read_by {setting.read_by}"


def test_every_profile_passes_the_check(tmp_path):
    for path in sorted((PROJECT / "configs").glob("*.yaml")):
        plan = pipeline.stage_plan(pipeline.load_profile(path), tmp_path)
        assert plan and all(s["params"]["run_name"] == plan[0]["params"]["run_name"] for s in plan)


def test_training_defaults_are_valid_and_losses_agree():
    from helpers.kd import distill, losses

    assert settings.check_training(dict(settings.TRAINING_DEFAULTS)) == settings.TRAINING_DEFAULTS
    assert distill.DEFAULTS == settings.TRAINING_DEFAULTS
    assert set(settings.LOSS_KINDS) == set(losses.KINDS)


def test_settings_table_documents_every_setting():
    md = settings.markdown()
    for name in list(settings.PARAMS) + list(settings.TRAINING):
        assert f"| `{name}` |" in md
