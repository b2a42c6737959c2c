"""Every setting a profile, a variant row or ``--set`` can give, declared once: type, range, meaning.

The notebooks' parameters cells stay their interface (and hold the defaults a notebook uses
when run by hand); this table says what each name means and what values it accepts, and the
runner checks a profile against it before the first stage starts::

    python -m helpers.pipeline --profile quick --check     # validate and print, run nothing
    python -m helpers.settings                             # this table as Markdown

Numbers are read as numbers wherever they are written: YAML reads ``2e-5`` and ``1.0e6`` as
text, so profiles and ``--set`` values are parsed with :func:`load_yaml`, which takes them as
floats, and :func:`check` turns numeric text and whole floats into the declared type.

A problem is one line that names the setting, where it came from, the value and what is
allowed; an unknown name comes with the closest known one.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import one_line

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "ce")
TEACHER_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tv")
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
DATA_SOURCES = ("word_arith", "gsm_symbolic", "gsm_symbolic-2step", "gsm8k", "gsm8k-socratic")
EXTRACT_MODES = ("robust", "seed")
OPTIMIZERS = ("sgd", "adamw")
UNFINISHED = ("keep", "drop")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")  # where training curves go (accelerate's trackers)
BACKENDS = ("transformers", "llama_cpp", "vllm", "openai", "exllamav2", "exllamav3")  # teacher engines (helpers.backends)
REFERENCE_SUFFIX = "@reference"
CONTROL_ROW = "no-distillation"  # the assessment's name for the untouched student


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming it."""


# --------------------------------------------------------------------------- YAML with real numbers
class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``2e-5``, ``1e6`` and ``1.0e6`` are floats (YAML 1.2)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------- value types
_NUMBER = re.compile(r"^\s*[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$")


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Num:
    """An int or a float with an optional range (open or closed at each end)."""
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        name = "an integer" if self.kind is int else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '≥'} {_fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '≤'} {_fmt(self.hi)}")
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{name} in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        return f"{name} {' and '.join(parts)}" if parts else name

    def coerce(self, v: Any) -> Any:
        if isinstance(v, bool):
            raise TypeError
        if isinstance(v, str) and _NUMBER.match(v):
            v = float(v.replace("_", ""))
        if isinstance(v, (int, float)):
            if self.kind is int:
                if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
                    raise TypeError
                v = int(v)
            else:
                v = float(v)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError
            if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
                raise ValueError
            if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
                raise ValueError
            return v
        raise TypeError


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.options)

    def coerce(self, v: Any) -> Any:
        if not isinstance(v, str):
            raise TypeError
        if v not in self.options:
            raise ValueError
        return v


@dataclass(frozen=True)
class Text:
    """A non-empty string (a model id, a path, a name); ``pattern`` restricts it further."""
    pattern: str | None = None
    what: str = "a non-empty text"

    def describe(self) -> str:
        return self.what

    def coerce(self, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise TypeError
        if not v.strip() or (self.pattern and not re.fullmatch(self.pattern, v)):
            raise ValueError
        return v


@dataclass(frozen=True)
class Kind:
    """A value of one Python type: a flag, or a mapping that a function of its own checks further
    (variant rows, templates, experiments)."""
    python: type
    what: str

    def describe(self) -> str:
        return self.what

    def coerce(self, v: Any) -> Any:
        if not isinstance(v, self.python):
            raise TypeError
        return v


def Flag() -> Kind:  # noqa: N802
    return Kind(bool, "true or false")


def Mapping(what: str) -> Kind:  # noqa: N802
    return Kind(dict, what)


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int = 0

    def describe(self) -> str:
        return f"a list of {self.item.describe()}" + (f" (at least {self.min_len})" if self.min_len else "")

    def coerce(self, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise TypeError
        if len(v) < self.min_len:
            raise ValueError
        return [self.item.coerce(x) for x in v]


@dataclass(frozen=True)
class Setting:
    name: str
    type: Any
    meaning: str
    optional: bool = False          # None (YAML null) allowed
    runner: bool = False            # set by the runner, not by a profile
    default: Any = None             # only for training settings (notebooks hold their own defaults)
    read_by: tuple[str, ...] = ()   # notebooks that read it (documentation; checked by the tests)

    def describe(self) -> str:
        return self.type.describe() + (" or null" if self.optional else "")


_SIZE = Num(int, 1)
_NOTEBOOKS = ("01", "02", "03", "04", "05", "06")


def _s(name, type_, meaning, *, optional=False, runner=False, read_by=_NOTEBOOKS):
    return Setting(name, type_, meaning, optional=optional, runner=runner, read_by=tuple(read_by))


# --------------------------------------------------------------------------- the table
PARAMS: dict[str, Setting] = {s.name: s for s in [
    # set by the runner
    _s("run_name", Text(r"[A-Za-z0-9._-]+", "a name of letters, digits, '.', '_' or '-'"),
       "name of the run: results/<run_name>/ and logs/<run_name>/ (default: the profile's run)"),
    _s("results_dir", Text(), "folder for large outputs (set by the runner from run_name)", runner=True),
    _s("logs_dir", Text(), "folder for tables (set by the runner from run_name)", runner=True),
    _s("variant", Text(), "the variant this instance of 02 trains (set by the runner's 'each')",
       runner=True, read_by=("02",)),
    _s("variant_spec", Mapping("a variant row"), "that variant's row (set by the runner)", runner=True, read_by=("02",)),
    # data
    _s("seed", Num(int, 0), "seed of the data splits, sampling and training"),
    _s("data_source", Choice(DATA_SOURCES), "where problems come from"),
    _s("data_dir", Text(what="a folder that exists"), "folder with GSM8K's JSONL files (null: the datasets library)",
       optional=True),
    _s("n_train", _SIZE, "training problems"),
    _s("n_validation", _SIZE, "validation problems (tuning and the validation loss only)"),
    _s("n_test", _SIZE, "test problems (assessment only)"),
    # models
    _s("teacher", Text(what="a model id, folder or embedded name"), "the teacher model (02 reads it for on-policy KD)",
       read_by=("01", "02", "05")),
    _s("teacher_backend", Choice(BACKENDS), "the engine that runs the teacher: transformers (the reference), "
       "llama_cpp (GGUF files on a CPU; extra [cpu-fast]), vllm (CUDA; extra [vllm]), openai (any OpenAI-compatible "
       "completions server: vllm serve, SGLang, llama_cpp.server), exllamav2 (EXL2/GPTQ on CUDA; extra [exl2]) or "
       "exllamav3 (EXL3 on CUDA; extra [exl3]); 01 writes the stores with it and 02 scores on-policy samples with it",
       read_by=("01", "02")),
    _s("teacher_backend_options", Mapping("a mapping of the back end's own options"),
       "options of teacher_backend (llama_cpp: n_ctx, n_threads, n_gpu_layers, tokenizer; vllm: url, "
       "tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization, max_model_len, max_logprobs; "
       "openai: url, model, tokenizer, api_key, timeout, retries, backoff, tokens (auto | ids | text); "
       "exllamav2: gpu_split, max_seq_len, cache_bits, tokenizer; exllamav3: the same and max_chunk_size)",
       optional=True, read_by=("01", "02")),
    _s("student", Text(what="a model id, folder or embedded name"), "the student model", read_by=("02", "03", "06")),
    _s("dtype", Choice(DTYPES), "weights' dtype (auto: bf16 on recent GPUs, fp16 on older ones; on a CPU bf16 only "
       "where it is native (AVX512-BF16, AMX, Arm BF16), else fp32)"),
    _s("device", Text(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:N"), "where models run"),
    # teacher (01)
    _s("strategies", ListOf(Text(what="a strategy name, or name@reference")),
       "prompting strategies the teacher writes under ('name@reference': it reads the reference solution)",
       read_by=("01", "03")),
    _s("prompt_templates", Mapping("a mapping of strategy name to a template containing {question}"),
       "strategy prompts to edit or add", optional=True, read_by=("01", "04")),
    _s("teacher_k", _SIZE, "top-k log-probs stored per teacher token", read_by=("01", "05", "06")),
    _s("teacher_max_new_tokens", _SIZE, "longest teacher solution, in tokens", read_by=("01", "05")),
    _s("teacher_batch_size", _SIZE, "teacher generation (or scoring) batch", read_by=("01", "05", "06")),
    _s("teacher_do_sample", Flag(), "sample the teacher's solutions (false: greedy)", read_by=("01",)),
    _s("teacher_temperature", Num(float, 0, lo_open=True), "teacher sampling temperature", read_by=("01",)),
    _s("teacher_top_p", Num(float, 0, 1, lo_open=True), "teacher nucleus sampling mass", read_by=("01",)),
    _s("shard_size", _SIZE, "questions per teacher-store shard", read_by=("01",)),
    _s("teacher_unfinished", Choice(UNFINISHED),
       "teacher solutions that did not end at end-of-sequence (stopped in a loop or at teacher_max_new_tokens): "
       "keep them for training (their tokens still carry the teacher's distributions) or drop them",
       read_by=("01", "02")),
    _s("stop_loops", Flag(), "stop a teacher solution or a test response that repeats one to four lines three times "
       "in a row (numbers aside, or one token block exactly); counted as 'looped', apart from finished and cut",
       read_by=("01", "03", "06")),
    # distillation (02)
    _s("seeds", ListOf(Num(int, 0), 1), "training seeds: every variant is trained and assessed once per seed, and "
       "the tables give the mean and spread across seeds beside the pooled CI (null: one training, seed 'seed')",
       optional=True, read_by=("02", "03")),
    _s("tracker", Choice(TRACKERS), "where each variant's training curves go, per optimizer step (loss, KD and CE "
       "terms, learning rate, gradient norm) and epoch (validation loss), with its settings as hyper-parameters: "
       "none, tensorboard (extra [tensorboard]; results/<run>/tracker/<variant>), wandb or mlflow (their own "
       "packages and login)", read_by=("02",)),
    _s("training", Mapping("a mapping of training settings (see 'Training settings')"),
       "training settings shared by every variant (and fusion row); a row's own keys win", read_by=("02", "06")),
    _s("variants", Mapping("a mapping of variant name to its row"),
       "KD variants: one row each (strategy, loss, T, alpha, beta, any training setting)", read_by=("03",)),
    # assessment (03)
    _s("experiments", Mapping("a mapping of row name to {model, adapter}"),
       "extra rows of the accuracy table", read_by=("03",)),
    _s("primary", Text(what="a variant name"), "the pre-registered primary row: compared first, against "
       "no-distillation and then fine-tuning, with the smallest difference the test split can detect",
       optional=True, read_by=("03",)),
    _s("batch_size", _SIZE, "generation rows in flight in assessment, Co-LLM and fusion", read_by=("03", "04", "06")),
    _s("max_new_tokens", _SIZE, "longest response in assessment, Co-LLM and fusion, in tokens",
       read_by=("03", "04", "06")),
    _s("extract_mode", Choice(EXTRACT_MODES), "answer extraction rules (seed: the study's)", read_by=("01", "03", "04", "06")),
    # Co-LLM (04)
    _s("base", Text(what="a model id, folder or embedded name"), "Co-LLM base model (it learns to defer)",
       read_by=("04",)),
    _s("base_adapter", Text(what="an adapter folder"), "LoRA adapter on the base", optional=True, read_by=("04",)),
    _s("assistant", Text(what="a model id, folder or embedded name"), "Co-LLM assistant model", read_by=("04",)),
    _s("assistant_strategy", Text(what="a strategy name"), "the prompt the assistant sees", read_by=("04",)),
    _s("collm_train_base", Flag(), "train LoRA on the base jointly with the head (false: the head alone)",
       read_by=("04",)),
    _s("collm_init_epochs", _SIZE, "weak-supervision epochs of the head (most; early stopping may end sooner)",
       read_by=("04",)),
    _s("collm_epochs", _SIZE, "marginal-likelihood epochs (most; early stopping may end sooner)", read_by=("04",)),
    _s("collm_lr", Num(float, 0, lo_open=True),
       "Adam learning rate of the deferral head (with collm_train_base: ×0.1 for LoRA and head)", read_by=("04",)),
    _s("collm_weight_decay", Num(float, 0),
       "L2 penalty weight_decay/2·‖θ‖² on the deferral head (0: none); keeps its logits finite where the "
       "assistant is always better", read_by=("04",)),
    _s("collm_patience", _SIZE, "epochs without a better validation loss before head training stops; the best "
       "epoch's weights are kept (null: run every epoch, still keep the best)", optional=True, read_by=("04",)),
    _s("deferral_grid", ListOf(Num(float, 0, 1), 1), "target deferral frequencies searched on validation",
       read_by=("04",)),
    _s("collm_n_validation", _SIZE, "validation problems decoded to choose η (null: all)", optional=True,
       read_by=("04",)),
    _s("collm_n_test", _SIZE, "test problems decoded per method (null: all)", optional=True, read_by=("04",)),
    _s("collm_asst_chunk", _SIZE, "with an assistant of another tokenizer: at most this many of its tokens per "
       "deferral (it hands back earlier where a piece of both tokenizations ends)", read_by=("04",)),
    # speculative decoding (05)
    _s("spec_target", Text(what="a model id, folder or embedded name"), "the model speculative decoding speeds up",
       read_by=("05",)),
    _s("spec_drafters", ListOf(Text(what="truncated, kd, ngram, prompt-lookup, or a model with the target's tokenizer"), 1),
       "drafters to measure: truncated (the target's first spec_layers layers, copied, with a spec_draft_vocab "
       "head), kd (that copy distilled "
       "from the target), ngram (Kneser-Ney on the target's training solutions), prompt-lookup, or a model name",
       read_by=("05",)),
    _s("spec_layers", _SIZE, "decoder layers of the truncated drafter", read_by=("05",)),
    _s("spec_draft_vocab", _SIZE, "token ids in the LM head of the truncated and kd drafters: those the target "
       "puts most probability on over its training solutions (end of sequence always); the drafter proposes "
       "nothing else (null: the full vocabulary)", optional=True, read_by=("05",)),
    _s("spec_gammas", ListOf(_SIZE, 1), "draft lengths γ measured", read_by=("05",)),
    _s("spec_n_prompts", _SIZE, "test prompts decoded one at a time (batch 1) per drafter and γ", read_by=("05",)),
    _s("spec_max_new_tokens", _SIZE, "new tokens per prompt", read_by=("05",)),
    _s("spec_strategy", Text(what="a strategy name"), "whose teacher store (notebook 01) holds the target's own "
       "solutions for the kd and ngram drafters; used only when the teacher is the target, else the target writes "
       "its own", read_by=("05",)),
    _s("spec_kd", Mapping("a mapping of training settings (see 'Training settings')"),
       "training of the kd drafter (loss: tv trains 1 − α directly)", read_by=("05",)),
    _s("spec_kd_full", Flag(), "train every weight of the kd drafter but its input embeddings (false: LoRA "
       "adapters from spec_kd's lora_* settings, merged after)", read_by=("05",)),
    _s("spec_on_policy_rounds", Num(int, 0), "rounds of on-policy KD after the off-policy one: the drafter writes, "
       "the target scores, the drafter learns", read_by=("05",)),
    # fusion across tokenizers (06)
    _s("fusion_teachers", ListOf(Text(what="a model id, folder or embedded name"), 1),
       "teachers that read the reference solutions; any tokenizers (aligned by character offsets)", read_by=("06",)),
    _s("fusion_strategy", Text(what="a strategy name"), "the prompt each fusion teacher reads a reference under",
       read_by=("06",)),
    _s("fusion_rows", Mapping("a mapping of row name to {teachers, method, loss, alpha, T, any training setting}"),
       "rows of fusion.md besides no-distillation: {loss: ce} fine-tunes on the references; otherwise KD from "
       "'teachers' (default: all) fused by 'method' (minCE | avgCE | softmax)", read_by=("06",)),
    _s("fusion_tau", Num(float, 0, lo_open=True), "temperature of the softmax(−NLL per byte / τ) teacher weighting",
       read_by=("06",)),
]}


def _t(name, type_, default, meaning, optional=False):
    return Setting(name, type_, meaning, default=default, optional=optional, read_by=("02",))


TRAINING: dict[str, Setting] = {s.name: s for s in [
    _t("loss", Choice(LOSS_KINDS), "forward_kl", "the KD divergence (tv: total variation, 1 − a drafter's acceptance rate; ce: cross-entropy alone)"),
    _t("T", Num(float, 0, lo_open=True), 1.0, "temperature of both (k + 1)-way distributions"),
    _t("alpha", Num(float, 0, 1), 0.5, "KD weight: loss = alpha·T²·KD + (1 − alpha)·CE"),
    _t("beta", Num(float, 0, 1, lo_open=True, hi_open=True), 0.5, "JSD mixture weight β"),
    _t("optimizer", Choice(OPTIMIZERS), "sgd", "optimizer"),
    _t("lr", Num(float, 0, lo_open=True), 0.01, "peak learning rate (one cosine over the run)"),
    _t("momentum", Num(float, 0, 1, hi_open=True), 0.9, "SGD momentum"),
    _t("weight_decay", Num(float, 0), 0.0, "weight decay"),
    _t("epochs", _SIZE, 2, "passes over the training examples"),
    _t("batch_size", _SIZE, 4, "examples per micro-batch"),
    _t("grad_accum", _SIZE, 1, "micro-batches per optimizer step (weighted by token count)"),
    _t("max_length", Num(int, 2), 512, "prompt + solution tokens kept per example"),
    _t("lora_r", _SIZE, 4, "LoRA rank"),
    _t("lora_alpha", Num(float, 0, lo_open=True), 8, "LoRA scale numerator"),
    _t("lora_dropout", Num(float, 0, 1, hi_open=True), 0.1, "LoRA dropout"),
    _t("lora_layers", _SIZE, None, "LoRA on the top this many decoder layers only (null: every layer); the "
       "backward pass stops below the lowest, so fewer layers train faster", optional=True),
    _t("lora_targets", ListOf(Text(what="a module name"), 1), ["q_proj", "k_proj", "v_proj", "o_proj"],
       "modules that get LoRA"),
    _t("seed", Num(int, 0), 0, "training seed (default: the profile's seed)"),
    _t("loss_chunk", Num(int, 0), 0, "compute the loss from the last hidden states and the LM head this many "
       "target positions at a time, never holding fp32 logits for all positions (0: the plain loss on full "
       "logits); for 128k+ vocabularies"),
    _t("on_policy", Num(float, 0, 1), 0.0, "on-policy KD (GKD) λ: the share of batches whose completions the "
       "student samples and the teacher scores (0: off-policy, the teacher's stored solutions; default loss jsd)"),
    _t("on_policy_max_new_tokens", _SIZE, 128, "longest completion the student samples for an on-policy batch"),
]}
TRAINING_DEFAULTS: dict[str, Any] = {k: s.default for k, s in TRAINING.items()}
VARIANT_KEYS = ("strategy",) + tuple(TRAINING)


# --------------------------------------------------------------------------- checking
def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_value(setting: Setting, v: Any, where: str) -> Any:
    """``v`` coerced to ``setting``'s type, or a one-line ``SettingsError`` (``where`` prefixes it)."""
    if v is None:
        if setting.optional:
            return None
        raise SettingsError(f"{where}{setting.name}=null: expected {setting.describe()}")
    try:
        return setting.type.coerce(v)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}{setting.name}={v!r}: expected {setting.describe()}") from None


def _unknown(name: str, known, where: str, what: str = "setting") -> SettingsError:
    if not str(name).strip():
        return SettingsError(f"{where}empty {what} name")
    return SettingsError(f"{where}unknown {what} {name!r}{suggest(str(name), known)}")


def strategy_name(entry: str) -> str:
    """``gold-hint@reference`` -> ``gold-hint``."""
    return entry[: -len(REFERENCE_SUFFIX)] if entry.endswith(REFERENCE_SUFFIX) else entry


def check_templates(templates: dict | None, where: str = "") -> dict | None:
    if templates is None:
        return None
    for name, text in templates.items():
        if not isinstance(name, str) or not name.strip() or not isinstance(text, str):
            raise SettingsError(f"{where}prompt_templates: {name!r} must map a name to a template text")
        if "{question}" not in text:
            raise SettingsError(f"{where}prompt_templates[{name!r}]: the template has no {{question}} placeholder")
    return templates


def known_strategies(templates: dict | None = None) -> list[str]:
    from .prompts import strategy_names

    return strategy_names(templates)


def check_training(row: dict, where: str = "") -> dict:
    """Training settings (no ``strategy``), coerced; unknown keys are errors."""
    out = {}
    for key, v in row.items():
        if key not in TRAINING:
            raise _unknown(key, TRAINING, where, "training setting")
        out[key] = check_value(TRAINING[key], v, where)
    return out


def check_variant(name: str, row: dict | None, *, training: dict | None = None, strategies=None,
                  where: str = "") -> dict:
    """One variant row checked as a whole (with the shared ``training`` under it); returns the
    row coerced. ``strategies``: the teacher stores the profile builds (None: not checked)."""
    at = f"{where}variant {name!r}: "
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise SettingsError(f"{where}variant name {name!r}: use letters, digits, '-' or '_' (it names a folder)")
    if name == CONTROL_ROW:
        raise SettingsError(f"{at}the name is taken by the untouched student's row; choose another")
    row = dict(row or {})
    if not isinstance(row, dict):
        raise SettingsError(f"{at}a row is a mapping of settings, got {row!r}")
    for key in row:
        if key not in VARIANT_KEYS:
            raise _unknown(key, VARIANT_KEYS, at, "setting")
    if "loss" in row and row["loss"] not in LOSS_KINDS:
        raise SettingsError(f"{at}unknown loss {row['loss']!r}; valid losses: {', '.join(LOSS_KINDS)}")
    strategy = row.pop("strategy", None)
    on_policy = {**(training or {}), **row}.get("on_policy", 0)
    if on_policy and "loss" not in row and "loss" not in (training or {}):
        row["loss"] = "jsd"  # GKD's default divergence, JSD(β)
    out = check_training(row, at)
    merged = {**TRAINING_DEFAULTS, **(training or {}), **out}
    if merged["on_policy"] > 0 and (strategy is None or merged["loss"] == "ce"):
        raise SettingsError(f"{at}on_policy: {merged['on_policy']:g} distils the teacher on the student's own samples: "
                            "it needs a strategy (whose store's teacher scores them) and a KD loss, not 'ce'")
    if strategy is not None:
        if not isinstance(strategy, str) or not strategy.strip():
            raise SettingsError(f"{at}strategy must name one of the profile's strategies")
        if strategies is not None and strategy not in strategies:
            raise SettingsError(f"{at}strategy {strategy!r} has no teacher store in this profile; "
                                f"the profile's strategies: {', '.join(strategies)}")
        out = {"strategy": strategy, **out}
    elif merged["loss"] in TEACHER_LOSSES:
        have = f" (the profile's: {', '.join(strategies)})" if strategies else ""
        raise SettingsError(f"{at}loss {merged['loss']!r} learns from teacher distributions: add 'strategy: <name>'"
                            f"{have}; without a strategy only 'ce' (on the reference solutions) applies")
    return out


FUSION_METHODS = ("minCE", "avgCE", "softmax")


def check_fusion_row(name: str, row: dict | None, *, teachers=None, training: dict | None = None,
                     where: str = "") -> dict:
    """One fusion row checked as a whole: ``teachers`` (a list from ``fusion_teachers``; default all),
    ``method`` (for several teachers) and training settings; {loss: ce} trains on the references."""
    at = f"{where}fusion row {name!r}: "
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise SettingsError(f"{where}fusion row name {name!r}: use letters, digits, '-' or '_' (it names a folder)")
    if name == CONTROL_ROW:
        raise SettingsError(f"{at}the name is taken by the untouched student's row; choose another")
    if not isinstance(row, dict | None):
        raise SettingsError(f"{at}a row is a mapping of settings, got {row!r}")
    row = dict(row or {})
    names, method = row.pop("teachers", None), row.pop("method", None)
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SettingsError(f"{at}teachers must be a non-empty list of names from fusion_teachers, got {names!r}")
        unknown = [n for n in names if teachers is not None and n not in teachers]
        if unknown:
            raise SettingsError(f"{at}teacher(s) {unknown} are not in fusion_teachers ({', '.join(teachers or [])})")
    if method is not None and method not in FUSION_METHODS:
        raise SettingsError(f"{at}unknown method {method!r}{suggest(str(method), FUSION_METHODS)}; "
                            f"choose one of {', '.join(FUSION_METHODS)}")
    if "strategy" in row:
        raise SettingsError(f"{at}'strategy' belongs to variants; fusion teachers read under fusion_strategy")
    out = check_training(row, at)
    if out.get("on_policy", 0) > 0:
        raise SettingsError(f"{at}on_policy belongs to variants (02); fusion rows learn from the teachers' reference "
                            "scores")
    return {**({"teachers": names} if names is not None else {}), **({"method": method} if method else {}), **out}


def check_params(params: dict, *, origins: dict[str, str] | None = None, readers: set[str] | None = None) -> dict:
    """Check (and coerce) merged parameters; returns a new dict.

    ``origins`` says where each key came from (a file or ``--set``), for the messages;
    ``readers`` is the set of parameter names some stage of the profile reads (None: skip that check).
    """
    origins = origins or {}
    out: dict[str, Any] = {}
    for key, v in params.items():
        where = f"{origins.get(key, 'params')}: "
        if key not in PARAMS:
            raise _unknown(key, PARAMS, where)
        out[key] = check_value(PARAMS[key], v, where)
        if readers is not None and key not in readers and not PARAMS[key].runner:
            raise SettingsError(f"{where}{key!r} is not read by any stage of this profile "
                                f"(it is read by notebook {', '.join(PARAMS[key].read_by)})")
    o = lambda k: f"{origins.get(k, 'params')}: "  # noqa: E731
    if out.get("data_dir") is not None:
        if not out.get("data_source", "gsm_symbolic").startswith("gsm8k"):
            raise SettingsError(f"{o('data_dir')}data_dir is for the gsm8k sources; "
                                f"data_source is {out.get('data_source', 'gsm_symbolic')}")
        if not Path(out["data_dir"]).is_dir():
            raise SettingsError(f"{o('data_dir')}data_dir={out['data_dir']!r}: no such folder")
    templates = check_templates(out.get("prompt_templates"), o("prompt_templates"))
    known = known_strategies(templates)
    for entry in out.get("strategies") or []:
        if strategy_name(entry) not in known:
            raise SettingsError(f"{o('strategies')}unknown strategy {entry!r}{suggest(strategy_name(entry), known)}; "
                                f"known: {', '.join(known)}")
    if "assistant_strategy" in out and out["assistant_strategy"] not in known:
        raise SettingsError(f"{o('assistant_strategy')}unknown strategy {out['assistant_strategy']!r}"
                            f"{suggest(out['assistant_strategy'], known)}; known: {', '.join(known)}")
    if "training" in out:
        out["training"] = check_training(out["training"], f"{o('training')}training: ")
    if "variants" in out:
        out["variants"] = {name: check_variant(name, row, training=out.get("training"),
                                               strategies=out.get("strategies"), where=o("variants"))
                           for name, row in out["variants"].items()}
    if "variant_spec" in out:
        out["variant_spec"] = check_variant(out.get("variant", "?"), out["variant_spec"],
                                            training=out.get("training"), where=o("variants"))
    if "fusion_rows" in out:
        out["fusion_rows"] = {name: check_fusion_row(name, row, teachers=out.get("fusion_teachers"),
                                                     where=o("fusion_rows"))
                              for name, row in out["fusion_rows"].items()}
    for name, spec in (out.get("experiments") or {}).items():
        if not isinstance(spec, dict) or "model" not in spec or set(spec) - {"model", "adapter"}:
            raise SettingsError(f"{o('experiments')}experiment {name!r}: expected {{model: <id>, adapter: <folder or null>}}, "
                                f"got {spec!r}")
    return out


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"n_test=8"`` -> ("n_test", 8); the value is read as YAML (numbers like 2e-5 included)."""
    if "=" not in item:
        raise SettingsError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise SettingsError(f"--set {item!r}: empty setting name before '='")
    try:
        return key, load_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        return key, value


# --------------------------------------------------------------------------- profiles
STAGE_KEYS = ("notebook", "name", "params", "inputs", "each")
PROJECT = Path(__file__).resolve().parent.parent


def load_profile(profile: str | Path, configs_dir: str | Path | None = None) -> dict:
    """Read ``configs/<profile>.yaml`` (or a path) and check its shape (values: :func:`check_profile`)."""
    path = Path(profile)
    if not path.suffix:
        path = Path(configs_dir or PROJECT / "configs") / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(configs_dir or PROJECT / "configs").glob("*.yaml"))
        raise FileNotFoundError(f"profile {str(profile)!r} not found at {path}; known profiles: {', '.join(known)}")
    try:
        cfg = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML: {one_line(e)}") from None
    if not isinstance(cfg, dict):
        raise SettingsError(f"{path}: a profile is a mapping with run, params and stages")
    for key in cfg:
        if key not in ("run", "params", "stages"):
            raise SettingsError(f"{path}: unknown top-level field {key!r}{suggest(str(key), ('run', 'params', 'stages'))}; "
                             "a profile has run, params and stages")
    for key, kind in (("run", str), ("params", dict), ("stages", list)):
        if not isinstance(cfg.get(key), kind):
            raise SettingsError(f"{path}: field {key!r} must be a {kind.__name__}")
    for i, st in enumerate(cfg["stages"]):
        if not isinstance(st, dict) or "notebook" not in st:
            raise SettingsError(f"{path}: stage {i + 1} needs a 'notebook' field")
        for key in st:
            if key not in STAGE_KEYS:
                raise SettingsError(f"{path}: stage {i + 1} ({st['notebook']}): unknown field {key!r}"
                                 f"{suggest(str(key), STAGE_KEYS)}; a stage has {', '.join(STAGE_KEYS)}")
        st.setdefault("name", st["notebook"])
        st["params"] = st.get("params") or {}
        if not isinstance(st["params"], dict):
            raise SettingsError(f"{path}: stage {st['name']!r}: 'params' must be a mapping")
        st.setdefault("inputs", [])
    cfg["path"] = str(path)
    return cfg


def apply_overrides(params: dict, overrides: dict) -> dict:
    """``params`` with ``overrides`` applied; a dotted name changes one entry of a mapping
    (``training.lr=2e-5``, ``variants.teacher-kd.T=2``) and leaves the rest as it is."""
    import copy

    out = copy.deepcopy(params)
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
            continue
        node = out
        for i, part in enumerate(parts[:-1]):
            if not part:
                raise SettingsError(f"--set {key}=...: empty name between dots")
            child = node.get(part) if isinstance(node, dict) else None
            if child is None and i == 0 and part in ("training", "prompt_templates", "experiments", "variants"):
                child = node[part] = {}
            if not isinstance(child, dict):
                have = f"; it has {', '.join(map(str, node))}" if isinstance(node, dict) and node and i else ""
                raise SettingsError(f"--set {key}=...: {'.'.join(parts[:i + 1])!r} is not a mapping of this profile"
                                    f"{have}")
            node = child
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- documentation
def markdown() -> str:
    """The table of settings, for the README and ``python -m helpers.settings``."""
    lines = ["| setting | accepts | meaning | notebooks |", "|---|---|---|---|"]
    for s in PARAMS.values():
        lines.append(f"| `{s.name}` | {s.describe()} | {s.meaning} | {', '.join(s.read_by)} |")
    lines += ["", "Training settings (in `training:` or a variant row; a row also takes `strategy`):", "",
              "| setting | accepts | default | meaning |", "|---|---|---|---|"]
    for s in TRAINING.values():
        lines.append(f"| `{s.name}` | {s.describe()} | `{s.default}` | {s.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown())
