"""Shared fixtures: a tiny Llama and a tokenizer trained here, so tests need no downloads."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Question: what is 3 + 4? Answer: 7. #### 7",
    "0 1 2 3 4 5 6 7 8 9 + - * / = . , $ % : ( )",
]


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n``), each worker keeps its own share of the cores,
    and so do the processes it starts (notebook kernels, servers): torch's and llama.cpp's thread
    pools size themselves to it instead of every worker spinning threads on every core."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= count:
            os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % count::count])


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs first: under pytest-xdist one worker starts on them while the others
    share everything else."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def make_tokenizer(chat_template: bool = True, vocab_size: int = 300):
    """Byte-level BPE trained on CORPUS (lossless on any text); another ``vocab_size`` gives another
    segmentation of the same texts, with the same special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>")
    if chat_template:
        tok.chat_template = CHATML
    return tok


def make_metaspace_tokenizer(chat_template: bool = False):
    """Another segmentation of the same texts: a SentencePiece-style tokenizer (Unigram, '▁' for
    spaces) with its own special tokens, as a teacher or assistant with a different vocabulary has.
    Its vocabulary is fixed, not trained (Unigram training is not deterministic from run to run):
    every character of CORPUS alone and after '▁', and the words CORPUS uses twice or more, whole.
    Characters outside CORPUS become <unk>, so texts meant to round-trip use CORPUS's characters."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(CORPUS)) - {" "})
    words = Counter(w for line in CORPUS for w in line.split())
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -3.0)]
    vocab += [(c, -4.0) for c in chars] + [("▁" + c, -4.5) for c in chars]
    vocab += [("▁" + w, -2.0) for w, n in sorted(words.items()) if n > 1 and len(w) > 1]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    if chat_template:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return tok


def make_model(tok, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny chat model + tokenizer, loadable by path like any hub model."""
    path = tmp_path_factory.mktemp("tiny-chat")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """The tiny chat model and its tokenizer, loaded once per test module (fp32)."""
    from helpers import models

    return models.load_model(tiny_dir, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The same tiny model with a tokenizer that has no chat template (a base model)."""
    path = tmp_path_factory.mktemp("tiny-base")
    tok = make_tokenizer(chat_template=False)
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
