"""LoRA distillation of the student on a teacher store (or on reference solutions).

One short loop, top to bottom: examples joined to teacher records by id, real padded
mini-batches, the chosen loss (``helpers.kd.losses``), SGD with momentum (or AdamW) under one cosine
schedule over the whole run, validation loss after every epoch, the adapter saved at the end.
Devices and several GPUs are handled by ``accelerate``: the same code runs on a CPU, one GPU, or
under ``accelerate launch`` on several.

The student always sees the plain question (its chat template) followed by the solution tokens:
the teacher's own tokens for KD (the teacher saw its strategy prompt, the student does not), or
the reference solution for fine-tuning. Loss positions are the solution tokens only.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import file_record, is_done, one_line, write_json, write_manifest
from ..backends.capture import prompt_ids
from ..data import plain_solution
from ..models import adapter_damage, add_special_tokens, prompt_text, tokenizer_fingerprint
from ..prompts import student_messages
from ..settings import TRAINING_DEFAULTS, check_training, check_variant
from .batches import Example, collate  # noqa: F401  (part of this module's interface)
from .losses import KINDS, chunked_kd_loss, kd_loss

DEFAULTS = dict(TRAINING_DEFAULTS)  # declared (type, range, meaning) in helpers.settings


class TrainingDiverged(RuntimeError):
    """The loss or a gradient stopped being finite; nothing was saved."""


def build_examples(records, tokenizer, store=None, *, max_length: int = 512, unfinished: str = "keep",
                   teacher_prompts: bool = False) -> list[Example]:
    """Student examples for ``records``: KD targets from ``store`` (joined by id) or, without a
    store, the reference solution followed by end-of-sequence. Too-long examples are cut.
    ``unfinished="drop"`` leaves out teacher solutions that did not end at end-of-sequence.
    ``teacher_prompts``: also keep the prompt the store's teacher read (its strategy's template),
    for on-policy KD."""
    if unfinished not in ("keep", "drop"):
        raise ValueError(f"unfinished={unfinished!r}: use 'keep' or 'drop'")
    add = add_special_tokens(tokenizer)
    if store is not None:
        store.check_tokenizer(tokenizer_fingerprint(tokenizer))
        missing = [r.id for r in records if r.id not in store]
        if missing:
            raise ValueError(f"{len(missing)} example(s) have no teacher record in {store.path}, "
                             f"e.g. {missing[:3]}: build the store for the same split and sizes")
        if unfinished == "drop":
            records = [r for r in records if store.get(r.id).finished]
            if not records:
                raise ValueError(f"no teacher solution in {store.path} finished, so teacher_unfinished='drop' leaves "
                                 "nothing to train on: raise teacher_max_new_tokens or keep unfinished solutions")
    if teacher_prompts and store is None:
        raise ValueError("teacher prompts come from a teacher store; on-policy KD needs a variant with a strategy")
    out = []
    for r in records:
        prompt = tokenizer(prompt_text(tokenizer, student_messages(r.question)), add_special_tokens=add).input_ids
        teacher_prompt = _teacher_prompt(tokenizer, store, r) if teacher_prompts else None
        if store is not None:
            t = store.get(r.id)
            target, ids, lps, tails = list(map(int, t.token_ids)), t.topk_ids, t.topk_logprobs, t.tail_logprobs
        else:
            target = tokenizer(plain_solution(r.solution), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids = lps = tails = None
        room = max_length - len(prompt)
        if room < 1:
            raise ValueError(f"example {r.id}: the prompt alone has {len(prompt)} tokens, over max_length={max_length}")
        target = target[:room]
        if ids is not None:
            ids, lps, tails = ids[:room], lps[:room], tails[:room]
        out.append(Example(r.id, prompt + target, len(prompt), ids, lps, tails, teacher_prompt))
    return out


def _teacher_prompt(tokenizer, store, record) -> list[int]:
    """The prompt tokens the store's teacher read for ``record`` (its strategy's template, as recorded)."""
    from ..prompts import teacher_messages

    settings = store.manifest["settings"]
    messages = teacher_messages(settings["strategy"], record.question, plain_solution(record.solution),
                                {settings["strategy"]: settings["template"]})
    return prompt_ids(tokenizer, [prompt_text(tokenizer, messages)])[0]


def batch_loss(model, batch: dict, cfg: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Forward pass and the variant's loss on one collated batch; also returns the token count.
    With ``loss_chunk`` > 0 the model returns its last hidden states (and the logits of one
    position only) and ``chunked_kd_loss`` goes through the LM head that many positions at a time."""
    teacher = dict(T=cfg["T"], alpha=cfg["alpha"], beta=cfg["beta"], tail_logprobs=batch.get("tail_logprobs"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if cfg.get("loss_chunk"):
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
        head = getattr(model, "module", model).get_output_embeddings()  # through a DDP wrapper
        loss, parts = chunked_kd_loss(cfg["loss"], hidden, head.weight, batch["targets"], batch["mask"],
                                      batch.get("topk_ids"), batch.get("topk_logprobs"), lm_head_bias=head.bias,
                                      chunk=cfg["loss_chunk"], **teacher)
    else:
        logits = model(**inputs).logits[:, :-1]
        loss, parts = kd_loss(cfg["loss"], logits, batch["targets"], batch["mask"], batch.get("topk_ids"),
                              batch.get("topk_logprobs"), **teacher)
    return loss, parts, batch["mask"].sum()


def evaluate(model, loader, cfg: dict, accelerator=None, loss_fn=None) -> float:
    """Token-weighted mean loss over a loader."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            loss, _, n = (loss_fn or batch_loss)(model, batch, cfg)
            part = torch.stack([loss.detach().double() * n.double(), n.double()])
            if accelerator is not None:
                part = accelerator.reduce(part.to(accelerator.device), reduction="sum").cpu()
            total += part.cpu()
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def _likely_cause(cfg: dict) -> str:
    causes = []
    if cfg["loss"] != "ce" and cfg["T"] < 1.0:
        causes.append(f"temperature T={cfg['T']:g} below 1 sharpens the distributions")
    high = 0.1 if cfg["optimizer"] == "sgd" else 1e-2
    causes.append(f"learning rate lr={cfg['lr']:g} is {'high' if cfg['lr'] >= high else 'perhaps too high'} "
                  f"for {cfg['optimizer']}")
    return "; ".join(causes)


def _diverged(cfg: dict, name: str, what: str, value: float, step: int, epoch: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"variant {name!r}: the {what} became {value} at optimizer step {step} (epoch {epoch}); likely cause: "
        f"{_likely_cause(cfg)}. Training stopped; nothing was saved.")


def train(model, tokenizer, train_examples: list[Example], val_examples: list[Example], cfg: dict,
          progress: bool = True, name: str = "training", *, collate_fn=None, loss_fn=None, prepare_batch=None,
          lora: bool = True, tracker: str = "none", tracker_dir: str | Path | None = None,
          experiment: str = "kd-gsm", hyperparameters: dict | None = None):
    """Train LoRA adapters on ``model`` in place; returns ``(peft_model, history)``. ``lora=False``
    trains the model's own parameters that require a gradient instead (the caller freezes the
    others; the ``lora_*`` settings are unused) and returns ``(model, history)``.

    ``collate_fn(examples, pad_id)`` and ``loss_fn(model, batch, cfg) -> (loss, parts, tokens)``
    replace ``collate`` and ``batch_loss`` for examples of another kind (``helpers.fusion``: targets
    from teachers with other tokenizers). ``prepare_batch(model, batch) -> batch`` may replace a
    training batch before its loss (``on_policy.OnPolicy``: the student's own samples, scored by the
    teacher); its batches carry their ``examples``. Validation batches are never replaced.

    An optimizer step takes ``grad_accum`` micro-batches; each contributes in proportion to its
    number of target tokens (so a step's gradient is the token mean over the whole step, as
    with one big batch, also across processes). A loss or gradient that is not finite stops
    training at once with :class:`TrainingDiverged`.

    ``tracker`` (``settings.TRACKERS``): accelerate's tracker that receives, per optimizer step,
    ``train/loss``, ``train/kd`` and ``train/ce`` (the step's token means of the two terms; NaN
    where a term is off), ``train/lr`` and ``train/grad_norm``, and per epoch ``validation/loss``
    (the variant's loss on the validation examples: its divergence from the teacher for a KD row),
    with ``cfg`` and ``hyperparameters`` as the run's hyper-parameters. The run is ``name``;
    TensorBoard writes to ``tracker_dir/name``, wandb and mlflow file it under ``experiment``.
    """
    import contextlib
    import itertools

    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    cfg = {**DEFAULTS, **cfg}
    if cfg["loss"] not in KINDS:
        raise ValueError(f"unknown loss {cfg['loss']!r}; choose one of {', '.join(KINDS)}")
    collate_fn, loss_fn = collate_fn or collate, loss_fn or batch_loss
    if cfg["loss"] != "ce" and train_examples and getattr(train_examples[0], "topk_ids", 0) is None:
        raise ValueError(f"loss {cfg['loss']!r} needs teacher distributions; these examples have none")
    set_seed(cfg["seed"])
    accelerator = _tracked_accelerator(Accelerator, tracker, tracker_dir, name, experiment,
                                       {"variant": name, **cfg, **(hyperparameters or {})})
    if lora:
        top = cfg["lora_layers"]  # LoRA on the top layers only: backward stops below the lowest of them
        n_layers = model.config.get_text_config().num_hidden_layers
        layers = {} if top is None else {"layers_to_transform": list(range(max(0, n_layers - top), n_layers))}
        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                                 lora_dropout=cfg["lora_dropout"], **layers,
                                                 target_modules=list(cfg["lora_targets"]), task_type="CAUSAL_LM"))
    pad = tokenizer.pad_token_id
    keep = prepare_batch is not None  # the hook rebuilds batches from their examples
    make = lambda exs, shuffle: DataLoader(  # noqa: E731
        exs, batch_size=cfg["batch_size"], shuffle=shuffle, generator=torch.Generator().manual_seed(cfg["seed"]),
        collate_fn=lambda b: {**collate_fn(b, pad), **({"examples": b} if keep and shuffle else {})})
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    elif cfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; use sgd or adamw")
    model, opt, train_loader, val_loader = accelerator.prepare(model, opt, make(train_examples, True),
                                                               make(val_examples, False))
    accum = cfg["grad_accum"]
    # one cosine over every optimizer step of the whole run: no restart between epochs
    total_steps = cfg["epochs"] * math.ceil(len(train_loader) / accum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    history = {"step": [], "train_loss": [], "lr": [], "epoch_end_step": [], "val_loss": [],
               "micro_step": [], "micro_loss": [], "micro_tokens": [],
               "val_loss_before": evaluate(model, val_loader, cfg, accelerator, loss_fn)}
    accelerator.log({"validation/loss": history["val_loss_before"]}, step=0)
    step, t0 = 0, time.time()
    bar = tqdm(total=total_steps, desc=f"distilling {name}", disable=not (progress and accelerator.is_main_process))
    model.train()
    for epoch in range(1, cfg["epochs"] + 1):
        batches = iter(train_loader)  # windows of `accum` micro-batches, read as they are used
        while window := list(itertools.islice(batches, accum)):
            if prepare_batch is not None:
                window = [prepare_batch(accelerator.unwrap_model(model), b) for b in window]
            tokens = torch.stack([b["mask"].sum() for b in window]).sum().double()
            if accelerator.num_processes > 1:  # token weights over the global step
                tokens = accelerator.reduce(tokens.to(accelerator.device), reduction="sum")
            tokens = tokens.clamp_min(1.0)
            step_loss, terms = 0.0, {"kd": 0.0, "ce": 0.0}
            for j, batch in enumerate(window):
                sync = j == len(window) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, parts, n = loss_fn(model, batch, cfg)
                    if not torch.isfinite(loss):
                        raise _diverged(cfg, name, "loss", loss.item(), step + 1, epoch)
                    weight = (n.double() / tokens * accelerator.num_processes).item()
                    accelerator.backward(loss * weight)
                history["micro_step"].append(step + 1)
                history["micro_loss"].append(loss.item())
                history["micro_tokens"].append(int(n.item()))
                step_loss += loss.item() * weight / accelerator.num_processes
                for term in terms:
                    terms[term] += float(parts.get(term, math.nan)) * weight / accelerator.num_processes
            if accelerator.num_processes > 1:  # every process's share of the step's token mean
                step_loss = accelerator.reduce(torch.tensor(step_loss, dtype=torch.float64, device=accelerator.device),
                                               reduction="sum").item()
            grads = [p.grad.detach().float().norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads))
            if not torch.isfinite(norm):
                raise _diverged(cfg, name, "gradient norm", norm.item(), step + 1, epoch)
            opt.step()
            opt.zero_grad()
            history["lr"].append(sched.get_last_lr()[0])
            sched.step()
            step += 1
            history["step"].append(step)
            history["train_loss"].append(step_loss)
            if accelerator.log_with:
                if accelerator.num_processes > 1:
                    terms = {t: accelerator.reduce(torch.tensor(v, dtype=torch.float64, device=accelerator.device),
                                                   reduction="sum").item() for t, v in terms.items()}
                accelerator.log({"train/loss": step_loss, "train/kd": terms["kd"], "train/ce": terms["ce"],
                                 "train/lr": history["lr"][-1], "train/grad_norm": norm.item()}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        history["epoch_end_step"].append(step)
        val = evaluate(model, val_loader, cfg, accelerator, loss_fn)
        if not math.isfinite(val):
            raise _diverged(cfg, name, "validation loss", val, step, epoch)
        history["val_loss"].append(val)
        accelerator.log({"validation/loss": val}, step=step)
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group the caller still uses
        tracker.finish()
    history["seconds"] = round(time.time() - t0, 1)
    peft_model = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        # the weights are sharded over the processes: all of them join the gather, the main one saves it
        peft_model.full_state_dict = accelerator.get_state_dict(model)
    return peft_model, history


def _tracked_accelerator(Accelerator, tracker: str, tracker_dir, name: str, experiment: str, hyperparameters: dict):
    """An ``Accelerator`` logging to ``tracker`` (none: logging to nothing), its run started."""
    import importlib.util

    from ..settings import TRACKERS

    if tracker not in TRACKERS:
        raise ValueError(f"unknown tracker {tracker!r}; choose one of {', '.join(TRACKERS)}")
    if tracker == "none":
        return Accelerator()
    if importlib.util.find_spec(tracker) is None:
        extra = "pip install -e .[tensorboard]" if tracker == "tensorboard" else f"pip install {tracker}"
        raise RuntimeError(f"tracker {tracker!r} needs the {tracker} package, which is not installed: {extra}, "
                           "or set tracker: none")
    if tracker == "tensorboard" and tracker_dir is None:
        raise ValueError("tracker 'tensorboard' writes to a folder: give tracker_dir")
    accelerator = Accelerator(log_with=tracker, project_dir=None if tracker_dir is None else str(tracker_dir))
    # hyper-parameters as the trackers take them: numbers, text and flags; anything else as its text
    hp = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hyperparameters.items()}
    runs = {"tensorboard": (name, {}),
            "wandb": (experiment, {"name": name, **({"dir": str(tracker_dir)} if tracker_dir else {})}),
            "mlflow": (experiment, {"run_name": name})}
    project, init = runs[tracker]
    accelerator.init_trackers(project, config=hp, init_kwargs={tracker: init} if init else {})
    return accelerator


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "history.json")


def save_adapter(peft_model, out_dir: str | Path, history: dict, settings: dict) -> Path:
    """Write adapter + history + manifest to ``out_dir`` atomically (a temporary folder renamed).
    The manifest records each file's size and digest, so a damaged adapter is recognised."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        # under FSDP the full state gathered at the end of training (train); else the model's own
        peft_model.save_pretrained(tmp, state_dict=getattr(peft_model, "full_state_dict", None))
        write_json(tmp / "history.json", history)
        write_manifest(tmp, {"stage": "distill", "settings": settings, "helpers_version": __version__,
                             "files": {f: file_record(tmp / f) for f in ADAPTER_FILES}})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_history(adapter_dir: str | Path) -> dict:
    return json.loads((Path(adapter_dir) / "history.json").read_text())


def is_trained(adapter_dir: str | Path, settings: dict) -> bool:
    """True when ``adapter_dir`` holds an undamaged adapter trained with exactly ``settings``
    (a damaged one is reported in one line, and so trained again)."""
    adapter_dir = Path(adapter_dir)
    if not is_done(adapter_dir, settings):
        return False
    problem = adapter_damage(adapter_dir) or (None if (adapter_dir / "adapter_config.json").is_file()
                                              else "adapter_config.json: missing")
    if problem:
        print(f"adapter {adapter_dir} is damaged ({problem}); training it again", flush=True)
        return False
    return True


def adapter_dir(results_dir: str | Path, variant: str, seed: int | None = None) -> Path:
    """Where a variant's adapter goes: ``adapters/<variant>``, or ``adapters/<variant>@seed<N>``
    for one training seed of a profile with ``seeds``."""
    return Path(results_dir) / "adapters" / (variant if seed is None else f"{variant}@seed{seed}")


def run_variant(variant: str, variant_spec: dict, *, student: str, results_dir: str | Path, training: dict | None = None,
                data_source: str = "gsm_symbolic", data_dir: str | None = None, n_train: int = 0,
                n_validation: int = 0, n_test: int = 0, seed: int = 0, train_seed: int | None = None,
                unfinished: str = "keep", dtype: str = "auto", device: str = "auto", progress: bool = True,
                teacher: str | None = None, teacher_backend: str = "transformers",
                teacher_backend_options: dict | None = None, tracker: str = "none") -> Path:
    """Train one variant of a profile (notebook 02 and ``python -m helpers.kd.distill`` call this).

    ``variant_spec``: ``strategy`` (whose teacher store to learn from; none for the fine-tuning
    control on reference solutions) plus any setting of ``DEFAULTS`` (loss, T, alpha, lr, ...),
    which wins over ``training``. ``seed`` picks the data splits (and, by default, the training
    seed); ``train_seed`` trains one seed of a profile's ``seeds`` (LoRA initialisation, dropout,
    batch order) into its own folder. ``unfinished``: keep or drop teacher solutions that did not
    finish. ``tracker``: where the training curves go (``train``; TensorBoard under
    ``results_dir/tracker``). Skipped when the adapter exists with the same settings. Returns the adapter folder
    (``adapter_dir``). A variant with ``on_policy: λ > 0`` (GKD, ``on_policy.OnPolicy``) opens
    ``teacher`` (the store's teacher) on ``teacher_backend`` to score the student's samples.
    """
    from accelerate import PartialState

    from ..artifacts import fingerprint
    from ..data import load_splits
    from ..models import load_model, model_fingerprint
    from .logit_store import LogitStore
    from .teacher import store_dir

    training = check_training(dict(training or {}), "training: ")
    spec = check_variant(variant, variant_spec, training=training)
    strategy = spec.pop("strategy", None)
    cfg = {**DEFAULTS, "seed": seed, **training, **spec}
    if train_seed is not None:
        cfg["seed"] = train_seed
    results_dir = Path(results_dir)
    splits = load_splits(data_source, n_train=n_train, n_validation=n_validation, n_test=n_test,
                         seed=seed, data_dir=data_dir)
    stores = {s: LogitStore(store_dir(results_dir, strategy, s)) for s in ("train", "validation")} if strategy else {}
    for s, st in stores.items():
        if not st.complete:
            raise ValueError(f"teacher store {st.path} is incomplete: run notebooks/01_teacher_logits to the end")
    on_policy = cfg["on_policy"] > 0
    if on_policy:
        _check_on_policy_teacher(teacher, stores["train"])
    out_dir = adapter_dir(results_dir, variant, train_seed)
    settings = {"student": model_fingerprint(student), "strategy": strategy, "config": cfg, "dtype": dtype,
                **({"on_policy_backend": teacher_backend} if on_policy else {}),
                **({"unfinished": unfinished} if strategy and unfinished != "keep" else {}),
                "stores": {s: st.manifest["settings"] for s, st in stores.items()},
                "examples": {s: fingerprint([r.id for r in splits[s]]) for s in ("train", "validation")}}
    print(f"variant {variant}: strategy={strategy}, loss={cfg['loss']}, T={cfg['T']}, alpha={cfg['alpha']}, "
          f"optimizer={cfg['optimizer']} lr={cfg['lr']}, epochs={cfg['epochs']}", flush=True)
    if is_trained(out_dir, settings):
        print(f"already trained with these settings: {out_dir}")
        return out_dir
    # one process per device under `accelerate launch`; ACCELERATE_USE_CPU=1 (set by `--cpu`) keeps several
    # processes on the CPU, talking over gloo
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    if state.num_processes > 1 and state.is_main_process:
        print(f"training on {state.num_processes} processes ({state.distributed_type.name}, {state.backend})",
              flush=True)
    model, tok = load_model(student, dtype=dtype, device=str(state.device) if device == "auto" else device)
    train_ex = build_examples(splits["train"], tok, stores.get("train"), max_length=cfg["max_length"],
                              unfinished=unfinished, teacher_prompts=on_policy)
    val_ex = build_examples(splits["validation"], tok, stores.get("validation"), max_length=cfg["max_length"],
                            unfinished=unfinished)
    print(f"{len(train_ex)} training examples, {sum(len(e.input_ids) - e.n_prompt for e in train_ex)} target tokens; "
          f"{len(val_ex)} validation examples", flush=True)
    hook = None
    if on_policy:
        from ..backends import open_backend
        from .on_policy import OnPolicy

        if teacher_backend == "vllm" and model.device.type == "cuda":  # vLLM beside the student on the GPU
            from ..backends.vllm_engine import check_share_beside_training

            check_share_beside_training(teacher_backend_options, *torch.cuda.mem_get_info(model.device))
        engine = open_backend(teacher_backend, teacher, dtype=dtype, device=str(state.device) if device == "auto"
                              else device, options=teacher_backend_options)
        hook = OnPolicy(engine, tok, cfg["on_policy"], k=stores["train"].manifest["settings"]["k"],
                        max_new_tokens=cfg["on_policy_max_new_tokens"], max_length=cfg["max_length"],
                        seed=cfg["seed"] + state.process_index)
    run = variant if train_seed is None else f"{variant}@seed{train_seed}"
    peft_model, history = train(model, tok, train_ex, val_ex, cfg, progress=progress, name=run,
                                prepare_batch=hook, tracker=tracker, tracker_dir=results_dir / "tracker",
                                experiment=results_dir.name, hyperparameters={"strategy": strategy, "student": student})
    if hook is not None:
        hook.engine.close()
        history["on_policy_batches"] = [hook.sampled, hook.batches]
        print(f"on-policy: {hook.sampled} of {hook.batches} batches were the student's own samples", flush=True)
    if state.is_main_process:
        save_adapter(peft_model, out_dir, history, settings)
        print(f"trained in {history['seconds']} s; saved to {out_dir}")
    state.wait_for_everyone()
    return out_dir


def _check_on_policy_teacher(teacher: str | None, store) -> None:
    from ..models import model_fingerprint

    if teacher is None:
        raise ValueError("on-policy KD needs the teacher (the profile's 'teacher') to score the student's samples")
    wrote = store.manifest["settings"]["teacher"]
    if wrote != model_fingerprint(teacher):
        raise ValueError(f"on-policy KD: the teacher {teacher!r} is not the one that wrote {store.path} "
                         f"({wrote['model']!r}); the samples must be scored by the store's teacher")


def main(argv: list[str] | None = None) -> int:
    """Train one variant of a profile outside the notebooks, e.g. on several GPUs:
    ``accelerate launch -m helpers.kd.distill --profile full --variant teacher-kd``."""
    import argparse
    import sys

    from ..settings import check_params, load_profile

    ap = argparse.ArgumentParser(prog="python -m helpers.kd.distill", description=main.__doc__)
    ap.add_argument("--profile", default="quick", help="name in configs/ or a path to a YAML profile")
    ap.add_argument("--variant", required=True, help="a key of the profile's variants")
    ap.add_argument("--root", default=".", help="where results/ lives (default: the current directory)")
    ap.add_argument("--seed", type=int, default=None,
                    help="one training seed (default: each of the profile's seeds, or its seed)")
    args = ap.parse_args(argv)
    try:
        cfg = load_profile(args.profile)
        p = check_params(cfg["params"], origins={k: cfg["path"] for k in cfg["params"]})
        if args.variant not in (p.get("variants") or {}):
            raise ValueError(f"variant {args.variant!r} is not in {cfg['path']}; variants: "
                             f"{', '.join(p.get('variants') or {})}")
        for train_seed in [args.seed] if args.seed is not None else (p.get("seeds") or [None]):
            run_variant(args.variant, p["variants"][args.variant], student=p["student"], training=p.get("training"),
                        results_dir=Path(args.root) / "results" / cfg["run"],
                        data_source=p.get("data_source", "gsm_symbolic"), data_dir=p.get("data_dir"),
                        n_train=p.get("n_train", 0), n_validation=p.get("n_validation", 0), n_test=p.get("n_test", 0),
                        seed=p.get("seed", 0), train_seed=train_seed, unfinished=p.get("teacher_unfinished", "keep"),
                        dtype=p.get("dtype", "auto"), teacher=p.get("teacher"),
                        teacher_backend=p.get("teacher_backend", "transformers"),
                        teacher_backend_options=p.get("teacher_backend_options"), tracker=p.get("tracker", "none"))
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
