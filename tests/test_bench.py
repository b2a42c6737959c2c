"""The benchmark runs end to end on a tiny model and writes its figures (no timing asserted here)."""
import json
import math

import pytest

from helpers import bench
from helpers.bench.fusion import _edit_distance


def test_bench_writes_its_figures(tiny_dir, tmp_path):
    bench.main(["--model", tiny_dir, "--batch", "2", "--tokens", "5", "--k", "8", "--train-batch", "2",
                "--train-length", "16", "--repeats", "1", "--dtype", "fp32", "--collm-tokens", "6",
                "--align-tokenizer", "trained", "--align-tokens", "24,48", "--align-repeats", "2",
                "--chunked-tokens", "8", "--chunked-hidden", "16", "--gen-prompts", "6", "--gen-batch", "4",
                "--gen-tokens", "12", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    # (k): refilled rows are the plain ones, token for token, and the speed-up is the ratio of the two rates
    assert result["generation_identical_rows"] == 6 and result["generation_tokens"] > 0
    assert result["generation_speedup"] == pytest.approx(
        result["generation_refilled_tokens_per_s"] / result["generation_plain_tokens_per_s"], rel=1e-12)
    # both timed runs wrote the same tokens, and the store holds exactly those
    assert result["same_tokens"] is True and result["generated_tokens"] == 10 and result["store_tokens"] == 10
    # each reported ratio is the ratio of the reported times it was computed from
    assert result["capture_ratio"] == pytest.approx(result["capture_s"] / result["plain_s"], rel=1e-12)
    assert result["kd_step_ratio"] == pytest.approx(result["kd_step_s"] / result["ce_step_s"], rel=1e-12)
    assert result["cross_kd_step_ratio"] == pytest.approx(result["cross_kd_step_s"] / result["same_kd_step_s"], rel=1e-12)
    bound = result["collm_base_s_per_token"] + result["collm_rate"] * result["collm_assistant_s_per_token"]
    assert result["collm_cost_ratio"] == pytest.approx(result["collm_s_per_token"] / bound, rel=1e-12)
    assert result["collm_reread_speedup"] == pytest.approx(
        result["collm_reread_s_per_token"] / result["collm_s_per_token"], rel=1e-12)
    # the store's arrays measured in the file cost exactly 6k + 12 bytes per token (k = 8)
    assert result["array_bytes_per_token"] == 6 * 8 + 12 == result["measured_array_bytes_per_token"]
    assert result["bytes_per_token"] > result["measured_array_bytes_per_token"]  # plus the header
    assert set(result["met"]) == {"generation_speedup", "capture_ratio", "kd_step_ratio", "cross_kd_step_ratio", "bytes_per_token", "collm_cost_ratio",
                                  "collm_reread_speedup", "fp32_bf16_generate_ratio", "fp32_bf16_train_ratio",
                                  "auto_picks_faster_dtype", "spec_measured_over_predicted", "spec_ours_over_assisted",
                                  *(f"align_{f}_{n}" for f in ("ratio", "e2e_ratio", "one_to_one_share")
                                    for n in (24, 48)),
                                  *(f"chunked_{f}_ratio_{v}" for f in ("memory", "time") for v in ("qwen2.5", "gemma3"))}
    # (i) chunked loss: each ratio is that of the reported peaks and times, at the real vocabulary sizes
    for name, vocab in (("qwen2.5", 151_936), ("gemma3", 262_144)):
        r = result["chunked"][name]
        assert r["vocab"] == vocab and r["hidden"] == 16 and r["plain_peak_bytes"] >= 0  # tiny: may not show
        assert r["memory_ratio"] == pytest.approx(r["chunked_peak_bytes"] / max(1, r["plain_peak_bytes"]), rel=1e-12)
        assert r["time_ratio"] == pytest.approx(r["chunked_s"] / r["plain_s"], rel=1e-12)
    # (g) alignment: DTW ÷ ours, alone and end to end (DTW's side adds its tokenization time)
    assert set(result["align_per_size"]) == {"24", "48"} and result["align_tokenizer_b"].startswith("Unigram")
    for n, r in result["align_per_size"].items():
        assert r["tokens_a"] == int(n) and result[f"align_ratio_{n}"] == r["ratio"]
        assert r["ratio"] == pytest.approx(r["dtw_s"] / r["ours_s"], rel=1e-12)
        assert r["e2e_ratio"] == pytest.approx((r["dtw_tokenize_s"] + r["dtw_s"]) / r["ours_e2e_s"], rel=1e-12)
        assert "dtw_path" not in r
    # (f) speculative: the tiny target has 2 layers, so the "truncated" drafter is a full copy: every
    # draft is accepted, greedy outputs equal plain generate, and the ratios are those of the times
    per_gamma = result["spec_per_gamma"]
    assert result["spec_layers"] == 2 and set(per_gamma) == {"1", "2", "3", "5"}
    assert all(v["alpha"] == 1.0 and v["identical"] for v in per_gamma.values()) and result["spec_identical"]
    best = per_gamma[str(result["spec_best_gamma"])]
    assert best["measured"] == max(v["measured"] for v in per_gamma.values())
    assert result["spec_measured_over_predicted"] == pytest.approx(best["measured"] / best["predicted"], rel=1e-12)
    assert result["spec_ours_over_assisted"] > 0
    # fp32 ÷ bf16: per generated token for generation, per step for training; auto's choice is stated
    per_token = lambda d: result[f"{d}_generate_s"] / result[f"{d}_generate_tokens"]  # noqa: E731
    assert result["fp32_bf16_generate_ratio"] == pytest.approx(per_token("fp32") / per_token("bf16"), rel=1e-12)
    assert result["fp32_bf16_train_ratio"] == pytest.approx(result["fp32_train_step_s"] / result["bf16_train_step_s"],
                                                            rel=1e-12)
    faster = "bf16" if result["fp32_bf16_generate_ratio"] * result["fp32_bf16_train_ratio"] > 1 else "fp32"
    assert result["faster_dtype"] == faster and result["auto_dtype"] in ("fp32", "bf16")
    assert result["met"]["auto_picks_faster_dtype"] == (result["auto_dtype"] == faster or abs(
        math.log(result["fp32_bf16_generate_ratio"] * result["fp32_bf16_train_ratio"]) / 2) < math.log(1.05))
    assert 0 < result["collm_rate"] < 1
    md = (tmp_path / "bench.md").read_text()
    assert "| capture_ratio |" in md and "| kd_step_ratio |" in md and "| bytes_per_token |" in md
    assert "| collm_cost_ratio |" in md and "| fp32_bf16_train_ratio |" in md


def test_bench_quick_fills_in_small_settings_and_prints_as_it_goes(tiny_dir, tmp_path, capsys):
    bench.main(["--model", tiny_dir, "--quick", "--k", "8", "--dtype", "fp32", "--skip-dtypes",
                "--skip-align", "--skip-chunked", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {k: result["setup"][k] for k in bench.QUICK} == bench.QUICK and result["setup"]["quick"] is True
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("(")]
    assert [line[:3] for line in lines[:7]] == ["(k)", "(a)", "(j)", "(b)", "(h)", "(d)", "(c)"]  # each as measured
    assert "is not a GGUF model" in lines[2] or "llama-cpp-python is not installed" in lines[2]  # (j) says why not
    assert "fp32_bf16_train_ratio" not in result and "align_per_size" not in result


def _is_warping_path(path, n, m):
    """From (0, 0) to (n - 1, m - 1), each step one ahead on one side or both: monotone, and every
    token of either side is on it."""
    steps = {(i2 - i1, j2 - j1) for (i1, j1), (i2, j2) in zip(path, path[1:])}
    return path[0] == (0, 0) and path[-1] == (n - 1, m - 1) and steps <= {(1, 0), (0, 1), (1, 1)}


def test_dtw_reference_pairs_tokens_by_their_strings():
    assert _edit_distance("kitten", "sitting") == 3 and _edit_distance("", "abc") == 3
    same = ["ĠThe", "Ġanswer", "Ġis", "Ġ", "7"]
    assert bench.dtw_reference(same, same) == [(k, k) for k in range(5)]
    # whitespace markers are stripped: "Ġcat" pairs with "▁c" and then "at"
    assert bench.dtw_reference(["Ġthe", "Ġcat"], ["▁the", "▁c", "at"]) == [(0, 0), (1, 1), (1, 2)]
    assert bench.dtw_reference([], ["a"]) == []


def test_align_entry_on_tiny_inputs():
    """(g) on two tokenizers trained in the tests (byte-level BPE and Unigram with '▁'): finite
    positive ratios, and a DTW path that is monotone and covers both token sequences."""
    from conftest import CORPUS, make_metaspace_tokenizer, make_tokenizer

    tok_a, tok_b = make_tokenizer(), make_metaspace_tokenizer()
    text = bench.align_text(tok_a, CORPUS, 40)
    assert text.startswith(CORPUS[0][:20]) and len(tok_a(text, add_special_tokens=False)["input_ids"]) == 40
    per_size = bench.bench_align(tok_a, tok_b, CORPUS, sizes=[16, 40], repeats=3)
    assert set(per_size) == {16, 40}
    for size, r in per_size.items():
        assert r["tokens_a"] == size and r["tokens_b"] > 0
        for key in ("ratio", "e2e_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["ratio"] == pytest.approx(r["dtw_s"] / r["ours_s"], rel=1e-12)
        assert _is_warping_path(r["dtw_path"], r["tokens_a"], r["tokens_b"])
        assert 0 <= r["one_to_one_share"] <= 1 and 0 <= r["dtw_agrees_on_one_to_one"] <= 1
    # texts shorter than a size are cycled until it is reached
    assert len(tok_a(bench.align_text(tok_a, CORPUS[:1], 200), add_special_tokens=False)["input_ids"]) == 200


def test_align_tokenizer_b_falls_back_to_a_trained_one_with_a_note(monkeypatch):
    from conftest import CORPUS
    from helpers import models

    tok, name, note = bench.align_tokenizer_b("trained", CORPUS)
    assert tok.is_fast and name.startswith("Unigram") and note is None
    monkeypatch.setattr(models, "EMBEDDED", {k: v for k, v in models.EMBEDDED.items() if k != bench.ALIGN_TOKENIZER})
    tok, name, note = bench.align_tokenizer_b(bench.ALIGN_TOKENIZER, CORPUS)
    assert name.startswith("Unigram") and bench.ALIGN_TOKENIZER in note and "not an embedded model" in note
    monkeypatch.setattr(models, "EMBEDDED", {bench.ALIGN_TOKENIZER: None})

    def missing(name):
        raise ModuleNotFoundError(f"the embedded model {name!r} needs a package")

    monkeypatch.setattr(models, "load_tokenizer", missing)
    tok, name, note = bench.align_tokenizer_b(bench.ALIGN_TOKENIZER, CORPUS)
    assert name.startswith("Unigram") and "ModuleNotFoundError" in note
    with pytest.raises(ModuleNotFoundError):  # a tokenizer asked for by name is not replaced silently
        bench.align_tokenizer_b("some-other-model", CORPUS)
