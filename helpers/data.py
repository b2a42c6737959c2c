"""Problem sources, all turned into one record shape.

``Record(id, question, solution, answer)``: ``solution`` is the reference chain of thought in
GSM8K form (ending in ``#### N``), ``answer`` the numeric gold answer as a float.

Sources
- ``gsm_symbolic`` (the embedded default): problems made offline by reasoning-gym's
  ``gsm_symbolic`` generator from a seed. One seeded stream is cut into test, validation and
  train, in that order, with duplicate questions dropped, so the test split depends only on
  its own size and never shares a question with the others.
- ``gsm_symbolic-2step``: the same stream, keeping only problems whose reference solution takes at
  most two calculation lines ("His cousin has 9 - 3 = 6 toys. Together, they have 9 + 6 = 15 toys."):
  about a third of GSM-Symbolic, the part a 135M model can partly solve and learn from on a laptop.
- ``gsm8k`` / ``gsm8k-socratic``: ``openai/gsm8k`` (configs ``main`` / ``socratic``) through
  ``datasets``, or, with ``data_dir``, the original JSONL files (``train.jsonl``, ``test.jsonl``,
  ``train_socratic.jsonl``, ``test_socratic.jsonl``). Validation is a seeded sample of the
  GSM8K train file, disjoint from the train split; test is GSM8K's test file.

Ids are stable: they depend on the source, the split and the problem, never on the order
in which records are later sorted or batched.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
SOURCES = ("word_arith", "gsm_symbolic", "gsm_symbolic-2step", "gsm8k", "gsm8k-socratic")
SYMBOLIC = {"gsm_symbolic": None, "gsm_symbolic-2step": 2}  # source -> most calculation steps (None: any)

# reasoning-gym appends an output instruction to every question; the project's prompts own
# that instruction instead, so GSM-Symbolic questions read like GSM8K ones.
_RG_SUFFIX = re.compile(r"\s*Give the result as your final answer\. Do not include units\.\s*$")
_CALC = re.compile(r"<<[^<>]*>>")
_GOLD_NUMBER = re.compile(r"^[-+−]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[-+−]?\$?\.\d+$")


@dataclass(frozen=True)
class Record:
    id: str
    question: str
    solution: str
    answer: float

    def to_dict(self) -> dict:
        return asdict(self)


def parse_gold(solution: str, where: str = "solution") -> float:
    """The number after the last ``####`` of a GSM8K solution: ``#### 1,234``, ``#### -5``, ``#### 2.5``."""
    if "####" not in solution:
        raise ValueError(f"{where}: no '#### <number>' gold answer at the end of the solution")
    raw = solution.rsplit("####", 1)[1].strip().rstrip(".")
    if not _GOLD_NUMBER.match(raw):
        raise ValueError(f"{where}: gold answer {raw!r} after '####' is not a number")
    return float(raw.replace(",", "").replace("$", "").replace(" ", "").replace("−", "-"))


def plain_solution(text: str) -> str:
    """A reference solution as a model should write it: GSM8K's ``<<48/2=24>>`` calculator notes removed."""
    return _CALC.sub("", text).strip()


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


# --------------------------------------------------------------------------- GSM-Symbolic
def solution_steps(solution: str) -> int:
    """Calculation lines of a GSM8K-style solution: its non-empty lines before ``####``."""
    return sum(1 for line in solution.split("####")[0].splitlines() if line.strip())


def _gsm_symbolic(seed: int, sizes: dict[str, int], max_steps: int | None = None) -> dict[str, list[Record]]:
    import reasoning_gym

    wanted = sum(sizes.values())
    out: dict[str, list[Record]] = {s: [] for s in ("test", "validation", "train")}
    order = [s for s in ("test", "validation", "train") if sizes.get(s, 0) > 0]
    seen: set[str] = set()
    # generate in growing chunks until every split is full (duplicates and the rare
    # inconsistent item are skipped, so a little more than `wanted` is needed)
    size, index = max(64, int(wanted * 1.1) + 16), 0
    while order:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        while index < size and order:
            item = ds[index]
            index += 1
            question = _RG_SUFFIX.sub("", item["question"]).strip()
            solution = item["metadata"]["answer_cot"].strip()
            if question in seen or (max_steps is not None and solution_steps(solution) > max_steps):
                continue
            try:
                gold = parse_gold(solution)
            except ValueError:
                continue
            if abs(gold - float(item["metadata"]["answer_value"])) > 1e-9:
                continue  # the generator's chain of thought and its answer disagree: skip it
            seen.add(question)
            split = order[0]
            out[split].append(Record(_stable_id(f"gsmsym{seed}", question), question, solution, gold))
            if len(out[split]) == sizes[split]:
                order.pop(0)
        size *= 2
        if size > 50 * wanted + 10_000:
            raise RuntimeError("gsm_symbolic produced too few distinct problems for the requested sizes")
    return out


# --------------------------------------------------------------------------- word arithmetic
_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
_ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "books", "shells", "coins", "cards", "flowers"]
# one template per step pattern: (question, solution lines), formatted with n (name), t (items),
# the numbers a, b, c and the results x (first step) and y (second step)
_WORD_TEMPLATES = [
    ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?",
     ["{n} has {a} + {b} = {x} {t} now."]),
    ("{n} had {a} {t} and gave {b} of them away. How many {t} does {n} have left?",
     ["{n} has {a} - {b} = {x} {t} left."]),
    ("{n} buys {a} bags with {b} {t} in each bag. How many {t} does {n} buy?",
     ["{n} buys {a} * {b} = {x} {t}."]),
    ("{n} has {a} {t}, gets {b} more, then gives away {c}. How many {t} does {n} have now?",
     ["After getting more, {n} has {a} + {b} = {x} {t}.", "After giving some away, {n} has {x} - {c} = {y} {t}."]),
    ("{n} has {a} boxes with {b} {t} in each box and {c} loose {t}. How many {t} does {n} have in all?",
     ["The boxes hold {a} * {b} = {x} {t}.", "In all, {n} has {x} + {c} = {y} {t}."]),
    ("{n} had {a} {t}, lost {b}, and then found {c}. How many {t} does {n} have now?",
     ["After losing some, {n} has {a} - {b} = {x} {t}.", "After finding some, {n} has {x} + {c} = {y} {t}."]),
]


def _word_problem(rng: random.Random) -> tuple[str, str, float]:
    """One seeded word problem: question, GSM8K-style solution ending in ``#### N``, the answer."""
    question, steps = rng.choice(_WORD_TEMPLATES)
    n, t = rng.choice(_NAMES), rng.choice(_ITEMS)
    if "*" in steps[0]:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        x = a * b
    elif "-" in steps[0]:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        x = a - b
    else:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        x = a + b
    c = rng.randint(1, x - 1) if "- {c}" in "".join(steps) else rng.randint(2, 30)
    y = x - c if "- {c}" in "".join(steps) else x + c
    values = {"n": n, "t": t, "a": a, "b": b, "c": c, "x": x, "y": y}
    answer = y if len(steps) == 2 else x
    solution = "\n".join(line.format(**values) for line in steps) + f"\n#### {answer}"
    return question.format(**values), solution, float(answer)


def _word_arith(seed: int, sizes: dict[str, int]) -> dict[str, list[Record]]:
    """Test, validation and train cut from one seeded stream of word problems, duplicates dropped."""
    rng = random.Random(f"word_arith-{seed}")
    out: dict[str, list[Record]] = {}
    seen: set[str] = set()
    for split in ("test", "validation", "train"):
        out[split] = []
        for _ in range(100 * sizes.get(split, 0) + 1000):
            if len(out[split]) == sizes.get(split, 0):
                break
            question, solution, answer = _word_problem(rng)
            if question not in seen:
                seen.add(question)
                out[split].append(Record(_stable_id(f"words{seed}", question), question, solution, answer))
        if len(out[split]) < sizes.get(split, 0):
            raise RuntimeError(f"word_arith produced too few distinct problems for {sizes[split]} {split} problems")
    return out


# --------------------------------------------------------------------------- GSM8K
def read_gsm8k_jsonl(path: str | Path, prefix: str | None = None) -> list[Record]:
    """Read a file in the original GSM8K format (one JSON object per line: question, answer).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and line for anything wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    prefix = prefix or f"gsm8k-{path.stem}"
    from .artifacts import iter_jsonl

    records, seen = [], {}
    for lineno, row in iter_jsonl(path, "a JSON object with 'question' and 'answer'"):
        where = f"{path}:{lineno}"
        for field in ("question", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{where}: missing or empty field {field!r}")
        records.append(_gsm8k_record(row["question"], row["answer"], prefix, where, seen))
    if not records:
        raise ValueError(f"{path}: no problems in the file")
    return records


def _gsm8k_record(question: str, answer: str, prefix: str, where: str, seen: dict) -> Record:
    gold = parse_gold(answer, where)
    rid = _stable_id(prefix, question.strip())
    if rid in seen:  # GSM8K has a few repeated questions: keep them, with distinct ids
        seen[rid] += 1
        rid = f"{rid}-{seen[rid]}"
    else:
        seen[rid] = 0
    return Record(rid, question.strip(), answer.strip(), gold)


def _gsm8k_hub(config: str, split: str, prefix: str) -> list[Record]:
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", config, split=split)
    except Exception as e:  # offline, no cache, or a hub error
        raise RuntimeError(
            f"could not load openai/gsm8k ({config}, {split}) through datasets: {e}\n"
            "Without a reachable hub, pass data_dir= pointing at the GSM8K JSONL files."
        ) from e
    seen: dict = {}
    return [_gsm8k_record(r["question"], r["answer"], prefix, f"openai/gsm8k[{split}] row {i}", seen)
            for i, r in enumerate(ds)]


def _gsm8k(source: str, seed: int, sizes: dict[str, int], data_dir: str | None) -> dict[str, list[Record]]:
    config = "socratic" if source == "gsm8k-socratic" else "main"
    suffix = "_socratic" if config == "socratic" else ""

    def load(file_split: str) -> list[Record]:
        prefix = f"gsm8k{suffix}-{file_split}"
        if data_dir is not None:
            return read_gsm8k_jsonl(Path(data_dir) / f"{file_split}{suffix}.jsonl", prefix)
        return _gsm8k_hub(config, file_split, prefix)

    out: dict[str, list[Record]] = {}
    if sizes.get("train", 0) or sizes.get("validation", 0):
        pool = load("train")
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        n_val = sizes.get("validation", 0)
        if n_val + sizes.get("train", 0) > len(pool):
            raise ValueError(f"asked for {n_val} validation + {sizes.get('train', 0)} train problems, "
                             f"but the GSM8K train file has {len(pool)}")
        out["validation"] = [pool[i] for i in order[:n_val]]
        out["train"] = [pool[i] for i in order[n_val:n_val + sizes.get("train", 0)]]
    if sizes.get("test", 0):
        test = load("test")
        out["test"] = test[: sizes["test"]]  # the file order: the first n are the same for every seed
    return out


# --------------------------------------------------------------------------- public API
def load_splits(source: str = "gsm_symbolic", *, n_train: int = 0, n_validation: int = 0,
                n_test: int = 0, seed: int = 0, data_dir: str | None = None) -> dict[str, list[Record]]:
    """Load train / validation / test records of one source (sizes of 0 skip a split)."""
    sizes = {"train": int(n_train), "validation": int(n_validation), "test": int(n_test)}
    if any(v < 0 for v in sizes.values()):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    if source in SYMBOLIC:
        if data_dir is not None:
            raise ValueError("data_dir is only for the gsm8k sources")
        out = _gsm_symbolic(seed, sizes, SYMBOLIC[source])
    elif source == "word_arith":
        if data_dir is not None:
            raise ValueError("data_dir is only for the gsm8k sources")
        out = _word_arith(seed, sizes)
    elif source in ("gsm8k", "gsm8k-socratic"):
        out = _gsm8k(source, seed, sizes, data_dir)
    else:
        raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    return {s: out.get(s, []) for s in SPLITS}


def load_split(split: str, source: str = "gsm_symbolic", n: int = 100, seed: int = 0,
               data_dir: str | None = None, **sizes: int) -> list[Record]:
    """One split. ``sizes`` (n_train=, n_validation=, n_test=) pins the other splits' sizes when
    the source cuts one stream into several (gsm_symbolic), so the records match load_splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    sizes = {f"n_{s}": sizes.get(f"n_{s}", 0) for s in SPLITS}
    sizes[f"n_{split}"] = n
    return load_splits(source, seed=seed, data_dir=data_dir, **sizes)[split]


def save_records(path: str | Path, records: list[Record]) -> Path:
    from .artifacts import write_jsonl

    return write_jsonl(path, [r.to_dict() for r in records])


def load_records(path: str | Path) -> list[Record]:
    """Read records written by ``save_records``; errors name the file and line."""
    from .artifacts import read_jsonl

    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("id", "question", "solution", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}: record {i} lacks field(s) {missing}")
        out.append(Record(str(row["id"]), row["question"], row["solution"], float(row["answer"])))
    return out
