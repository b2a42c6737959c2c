"""What the benchmark's entries share: the questions their prompts are made of (``QUESTIONS``),
timing two sides alternately after a warm-up of each (``_alternate``, ``_sync``), and a LoRA
student on random tokens with random sparse teacher targets for timed training steps
(``_lora_student``, ``_sparse_teacher``, ``_sgd_step``). Imports none of the entries."""
from __future__ import annotations

import time

import torch


QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Time a() and b() alternately after one warm-up of each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            acc.append(time.perf_counter() - t)
    return ta, tb


def _lora_student(model, *, batch: int, length: int, seed: int = 0):
    """``model`` with LoRA (q/k/v/o) in training mode, a batch of random tokens and SGD, for timed
    training steps; also the generator, for any further random inputs. ``peft_model.unload()`` undoes it."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.train()
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(peft_model.device)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return peft_model, ids, opt, g


def _sparse_teacher(g, vocab: int, shape: tuple, k: int, device):
    """Random top-k ids and log-probs of a teacher at every position of ``shape``."""
    topk_ids = torch.randint(0, vocab, (*shape, k), generator=g).to(device)
    return topk_ids, torch.log_softmax(torch.randn(*shape, k, generator=g), -1).to(device)


def _sgd_step(opt, loss) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad()
