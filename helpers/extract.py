"""Read the numeric final answer from a model's free-text GSM8K response.

Two modes are available (``MODES``); in each, the first rule that yields a
number wins, and every rule is also evaluated to fill ``Extraction.candidates``.

``mode="seed"`` reproduces the precedence of the published study exactly:

1. ``boxed``         - the FIRST ``\\boxed{...}``; first number inside it.
2. ``first_line``    - the first non-empty line, if it holds at least one
                       number and all its numbers are equal.
3. ``answer_phrase`` - the first "the answer is" / "the final answer is" /
                       "the correct answer is" (case-SENSITIVE, lowercase),
                       then the first number anywhere after it.
4. ``last_number``   - the number closest to the end of the text.

``mode="robust"`` (default) is case-insensitive.  It first truncates the text
at the first line (after some real content) that starts with ``Question:``,
``Q:`` or ``Problem:`` -- the model has begun inventing a new problem.  Then,
using the LAST occurrence that yields a number within each rule:

1. ``boxed``         - ``\\boxed{...}`` with LaTeX cleaned up (``\\$``, ``\\%``,
                       ``\\text{}``, ``\\,``, ``{,}``); ``\\frac{a}{b}`` -> a/b.
2. ``hashes``        - GSM8K style ``#### 18``.
3. ``answer_label``  - a line starting with ``Answer:``, ``Final Answer:`` or
                       ``A:`` (markdown bullets/bold allowed); first number
                       after the colon on that line (unless that line itself
                       says "the answer is N": then N).
4. ``answer_phrase`` - "(the) (final|correct) answer is(:)"; first number in
                       the rest of that line.
5. ``first_line``    - conservative: the first non-empty line holds exactly
                       one number, at most 5 words in total, at most 3 words
                       (units) after the number and nothing else but closing
                       punctuation; words before the number must contain a
                       linking word (is/are/was/were/equals/total/be) or
                       ``=``/``:``.  So ``18``, ``$18.``, ``18 dollars``,
                       ``The total is 18.`` fire; ``Step 1: ...``,
                       ``1. Janet ...`` and ``Janet has 16 eggs.`` do not.
6. ``last_number``   - the number closest to the end of the truncated text.

``needs_review`` is True when nothing was found, or when the explicit rules
(seed: boxed, answer_phrase; robust: boxed, hashes, answer_label,
answer_phrase) disagree (relative tolerance 1e-9).

Numbers: optional sign, optional ``$`` (``-$5`` and ``$-5``), thousands
groups (``1,234``; ``1,23`` reads as 1 and 23), decimals (``3.50``, ``.5``),
optional ``%`` (ignored).  A minus is a sign only when not directly preceded
by a digit, letter, ``)`` or ``.`` (``20-5=15`` gives 20, 5, 15); the Unicode
minus U+2212 is accepted.  A trailing sentence period is not a decimal point.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MODES = ("seed", "robust")

_MINUS = "-\u2212"
_NUM = re.compile(
    rf"(?P<prefix>(?<![\w).])[{_MINUS}+]\$?|\$[{_MINUS}+]?)?"
    r"(?<!\d)(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)%?"
)
_BOXED = re.compile(r"\\boxed\s*\{")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(
    rf"(?P<sign>[{_MINUS}]\s*)?\\[dt]?frac\s*\{{(?P<num>[^{{}}]*)\}}\s*\{{(?P<den>[^{{}}]*)\}}"
)
_HASHES = re.compile(r"#{4}[ \t]*(?:\*\*)?[ \t]*")
_LABEL = re.compile(
    r"^[-*#>_ \t]*(?:final[ \t]+answer|answer|a)[ \t]*(?:\*\*|__)?[ \t]*:(?P<rest>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_PHRASE_SEED = re.compile(r"the (?:final |correct )?answer is")
_PHRASE_ROBUST = re.compile(
    r"\b(?:the[ \t]+)?(?:final[ \t]+|correct[ \t]+)?answer[ \t]+is\b(?P<rest>[^\n]*)",
    re.IGNORECASE,
)
_TRUNCATE = re.compile(
    r"^[#*>_ \t]*(?:question|q|problem)[ \t]*(?:\*\*|__)?[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_LINK = re.compile(r"\b(?:is|are|was|were|equals?|total|be)\b|[=:]", re.IGNORECASE)
_AFTER_OK = re.compile(r"[ \t]*(?:[A-Za-z]+(?:'[A-Za-z]+)?[ \t]*){0,3}[.!$* \t]*")


@dataclass(frozen=True)
class Extraction:
    """Result of :func:`extract_details`."""

    value: float | None
    rule: str | None
    candidates: dict[str, float] = field(default_factory=dict)
    needs_review: bool = True


def _to_float(m: re.Match) -> float:
    value = float(m.group("body").replace(",", ""))
    prefix = m.group("prefix") or ""
    return -value if any(c in _MINUS for c in prefix) else value


def parse_number(token: str) -> float:
    """Parse one number token: ``"1,234"`` -> 1234.0, ``"-$5.50"`` -> -5.5,
    ``"25%"`` -> 25.0, ``"$-3"`` -> -3.0.  Raises ValueError on anything else."""
    m = _NUM.fullmatch(token.strip()) if isinstance(token, str) else None
    if m is None:
        raise ValueError(f"not a number: {token!r}")
    return _to_float(m)


def _first_number(s: str) -> float | None:
    m = _NUM.search(s)
    return _to_float(m) if m else None


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` with balanced braces, in order."""
    box_starts = {m.end() for m in _BOXED.finditer(text)}  # just after the "{"
    if not box_starts:
        return []
    found, stack = [], []  # one pass matching braces (linear, even if unbalanced)
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i + 1)
        elif ch == "}" and stack:
            start = stack.pop()
            if start in box_starts:
                found.append((start, text[start:i]))
    return [content for _, content in sorted(found)]


def _boxed_value(content: str) -> float | None:
    """First number of LaTeX box content, after cleaning; fractions evaluated."""
    s = content.replace("{,}", "").replace("\\,", "")
    s = s.replace("\\$", "").replace("\\%", "")
    s = _TEXT_WRAP.sub(r" \1 ", s)
    num, frac = _NUM.search(s), _FRAC.search(s)
    if frac and (num is None or frac.start() <= num.start()):
        try:
            value = parse_number(frac["num"]) / parse_number(frac["den"])
        except (ValueError, ZeroDivisionError):
            value = None
        if value is not None:
            return -value if frac["sign"] else value
    return _to_float(num) if num else None


def _last_hit(values) -> float | None:
    """Last non-None value of an iterable (the final statement counts)."""
    found = None
    for v in values:
        if v is not None:
            found = v
    return found


def _phrase_value(rest_of_line: str) -> float | None:
    m = _PHRASE_ROBUST.search(rest_of_line)
    return _first_number(m["rest"]) if m else None


def _label_value(rest_of_line: str) -> float | None:
    """First number after the label; but if the same line goes on to say
    "the answer is N" (one-line few-shot style ``A: ... The answer is 18.``),
    that N is the answer, not the first number of the reasoning."""
    phrased = _phrase_value(rest_of_line)
    return phrased if phrased is not None else _first_number(rest_of_line)


def _truncate(text: str) -> str:
    for m in _TRUNCATE.finditer(text):
        if text[:m.start()].strip():
            return text[:m.start()]
    return text


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def _seed_first_line(text: str) -> float | None:
    values = [_to_float(m) for m in _NUM.finditer(_first_line(text))]
    if values and all(_same(v, values[0]) for v in values):
        return values[0]
    return None


def _robust_first_line(text: str) -> float | None:
    line = _first_line(text).strip("#*>_ \t")
    nums = list(_NUM.finditer(line))
    if len(nums) != 1:
        return None
    before, after = line[:nums[0].start()], line[nums[0].end():]
    if not _AFTER_OK.fullmatch(after):
        return None
    words_before = _WORD.findall(before)
    if len(words_before) + len(_WORD.findall(after)) > 5:
        return None
    if words_before and not _LINK.search(before):
        return None
    return _to_float(nums[0])


def _seed_rules(text: str) -> dict[str, float | None]:
    boxes = _boxed_contents(text)
    phrase = _PHRASE_SEED.search(text)
    last = list(_NUM.finditer(text))
    return {
        "boxed": _first_number(boxes[0]) if boxes else None,
        "first_line": _seed_first_line(text),
        "answer_phrase": _first_number(text[phrase.end():]) if phrase else None,
        "last_number": _to_float(last[-1]) if last else None,
    }


def _robust_rules(text: str) -> dict[str, float | None]:
    text = _truncate(text)
    hashes = (_NUM.match(text, m.end()) for m in _HASHES.finditer(text))
    last = list(_NUM.finditer(text))
    return {
        "boxed": _last_hit(_boxed_value(c) for c in _boxed_contents(text)),
        "hashes": _last_hit(_to_float(m) if m else None for m in hashes),
        "answer_label": _last_hit(_label_value(m["rest"]) for m in _LABEL.finditer(text)),
        "answer_phrase": _last_hit(
            _first_number(m["rest"]) for m in _PHRASE_ROBUST.finditer(text)
        ),
        "first_line": _robust_first_line(text),
        "last_number": _to_float(last[-1]) if last else None,
    }


_EXPLICIT = {
    "seed": ("boxed", "answer_phrase"),
    "robust": ("boxed", "hashes", "answer_label", "answer_phrase"),
}


def extract_details(text: str, mode: str = "robust") -> Extraction:
    """Extract the final answer and report which rule fired, what every rule
    would give, and whether a human should look at it (see module docs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    text = text or ""
    results = _seed_rules(text) if mode == "seed" else _robust_rules(text)
    candidates = {rule: v for rule, v in results.items() if v is not None}
    rule = next(iter(candidates), None)
    value = candidates[rule] if rule else None
    explicit = [candidates[r] for r in _EXPLICIT[mode] if r in candidates]
    disagree = any(not _same(a, b) for a in explicit for b in explicit)
    return Extraction(value, rule, candidates, value is None or disagree)


def extract_answer(text: str, mode: str = "robust") -> float | None:
    """The numeric final answer of ``text``, or None when none is found."""
    return extract_details(text, mode).value
