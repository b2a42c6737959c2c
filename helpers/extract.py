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

``mode="robust"`` (default) is case-insensitive.  It first writes magnitudes
out (thousands separators ``90\\,000``, ``90{,}000``, ``90 000`` with a thin
or no-break space and ``90'000`` become ``90,000``; a number followed by
thousand/million/billion or a ``k`` suffix is multiplied: ``$90 thousand``,
``$90k`` -> 90000), truncates the text where the model starts a problem of its
own (see "Truncation" below) and drops exponents (``^2``, ``^{2}``), so
``48 m^2`` reads as 48.  Then, using the LAST statement that yields a number
within each rule:

1. ``asked_question`` - a sentence that says which value answers the asked
                       question (it settles which of two boxed answers
                       counts): "the answer to (the|your|this|our)
                       [original|first|asked|given|initial|main|actual]
                       (question|problem) [you asked|asked|above|here|
                       posed] is" + a statement, or
                       "N is the answer to your (...) question": the last
                       number of the clause before "is".
2. ``boxed``         - ``\\boxed{...}`` with LaTeX cleaned up (``\\$``, ``\\%``,
                       ``\\text{}``, ``\\,``, ``{,}``); ``\\frac{a}{b}`` -> a/b;
                       an equation's right-hand side (``2 + 3 = 5`` -> 5);
                       no number from an expression in words or unknowns
                       (``70 \\times \\text{hours} + 105``).
3. ``hashes``        - GSM8K style ``#### 18``.
   (These two, and the statements below, read a fraction written with an
   unspaced slash as its value: ``#### 3/4`` -> 0.75.)
4. ``answer_label``  - ``Answer:``, ``Final Answer:`` or ``A:`` starting a
                       line (markdown bullets/bold allowed), or ``Answer:`` /
                       ``Final Answer:`` starting a sentence mid-line (after
                       ``.``, ``!`` or ``?``) or set in bold there; each label
                       is a statement up to the next label or the line's end:
                       its last "the answer is" statement if it has one, else
                       a statement with no word limit.
5. ``answer_phrase`` - "(the) (final|correct) answer is(:)" (not "isn't"); a
                       statement up to the next such phrase or the line's
                       end, so a line's last statement wins.
6. ``first_line``    - conservative: the first non-empty line holds exactly
                       one number, at most 5 words in total, at most 3 words
                       (units) after the number and nothing else but closing
                       punctuation; words before the number must contain a
                       linking word (is/are/was/were/equals/total/be) or
                       ``=``/``:``.  So ``18``, ``$18.``, ``18 dollars``,
                       ``The total is 18.`` fire; ``Step 1: ...``,
                       ``1. Janet ...`` and ``Janet has 16 eggs.`` do not.
                       A fraction or mixed number there is its value
                       (``1/4`` -> 0.25, ``2 1/2 cups`` -> 2.5).
7. ``conclusion``    - the last concluding sentence: one opening with so,
                       therefore, thus, hence, altogether, overall, finally,
                       in total/all/the end/conclusion, or holding a ", so"
                       clause (not "so that", "so far"); its last number
                       (parenthesised working left out) must be followed by at
                       most eight words, none of them a verb such as is, are,
                       has, will, before the sentence ends ("So, Emma has
                       8 - 7 = 1 coin left.", "..., so she has 25 books now.");
                       a concluding sentence without digits reads its last
                       number spelled out, followed by at most three words
                       ("So, she has twenty-four apples left."; a lone "one"
                       or "zero" is no value).
                       A later sentence whose last number is an "=" result
                       with units or ``$`` ("= 138 flowers.", "= $18."), or
                       with at most five words before it ("She makes 9 * 2 =
                       18."), cancels it; a remark such as "This is a classic
                       example of a simple equation: 10 + 1 = 11." does not.  The rule
                       counts only when it differs from the last number (text
                       that goes on past its conclusion with more working or
                       remarks); it is then always marked ``needs_review``.
8. ``last_number``   - the number closest to the end of the truncated text.

A statement whose value is spelled out right after its phrase or label
("The answer is twelve.", "Answer: forty-two dollars", "one hundred and
five") reads that value, if at most three words (units; not "of", "more",
"than", "times", ...) follow it before punctuation.  Otherwise a statement
reads the first number after its phrase, unless the words before
that number (at most 4 of them for phrases; LaTeX commands are not words)
negate, bound or hedge it (not, no, never, either, between, more/less than,
at least/most, up to, unknown, depends, ...) or name a multiple-choice
letter: "The answer is (B)" yields nothing, and a letter counts only when
the number directly follows it ("B) 42" -> 42).  If the number starts an
arithmetic chain (numbers joined by ``+ - * / x × ÷ · ^ =``, ``\\times``,
``\\cdot``, ``\\div``, with ``$`` and brackets) that contains ``=``, its
result is read: the last side of an ``=`` that is a single number ("5 + 7 =
12" -> 12, "12 = 3 * 4" -> 12, "5 + 7 = 12 - 2 = 10" -> 10), or, when no side
is, the first number after the last ``=``.  Otherwise two
numbers joined by an unspaced hyphen or dash, an en dash, "to", "or" or
"and" are a range and yield nothing ("10-20", "10 to 20"); any other chain
without ``=`` ("9 * 2", "12 - 2") keeps its first number, except a fraction
of two numbers written with an unspaced slash ("3/4" -> 0.75).  A statement that
yields nothing leaves the rule to earlier statements, then to later rules.

Truncation (robust) cuts at the earliest marker that comes after some number
(so a response that opens by restating the problem is kept):

- a line opening with a problem title: optionally a list number (``2)``) and
  a qualifier (new, next, another, bonus, additional, similar, extra,
  follow-up, practice), then Question, Q, Problem, Example or Exercise,
  optionally numbered (``Q2``, ``Problem #3``), then ``:``, ``.``, ``)`` or
  the end of the line (markdown ``#``, ``*``, ``>`` around it allowed):
  ``Question:``, ``### Problem 2``, ``**Example 3:**``, ``### New Question``,
  ``# Exercise``, ``Problem 2.``, ``Next question:``.  Not titles:
  ``## Step 2:``, ``### Solution``, ``## Problem Analysis``, ``1. Janet ...``.
- a sentence (at a line start, or after ``.``, ``!``, ``?``) that hands out a
  new problem: "(Now) try/solve/attempt" + "this one", "this:", "the
  following problem", "another/a new/a similar/a different" + "one" or
  problem/question/exercise/example; "Your turn"; or one to six opening words
  (here's, let's, now, look at, give you, move on to, ...: words that do not
  carry a solution) + "another" or "a new/similar/different/related" + at
  most one word + problem/question/exercise/example ("Here's another problem
  for you:", "Now, let's look at a similar problem:"; not "This raises
  another question").  A title mid-line (``... dollars. Question: ...``) is
  no cut.
- an invented problem without a title, once an answer has been stated (a
  ``####`` line, an answer marker or a concluding sentence before it): a
  paragraph starting after a blank line or a ``####`` line whose sentences set
  up at least one number and end the line on a question opening with how,
  what, who, which, when, find, calculate, determine or if ("Tom has 4 pens.
  He buys 6 more. How many pens does he have?").  A question answered on its
  own line, or posed before any answer, or in a paragraph that opens by
  re-reading or working on the problem (wait, let's, check, recall, so, now,
  first, step, we, "the question", ...) is no cut.

``needs_review`` is True when nothing was found, or when the explicit rules
(seed: boxed, answer_phrase; robust: asked_question, boxed, hashes,
answer_label, answer_phrase) disagree (relative tolerance 1e-9), or (robust)
when the text has an answer marker (a box, a label, an answer phrase) but no
explicit rule read a number from it: "The answer is between 10 and 20" is not
a stated answer, whatever ``first_line`` or ``last_number`` give; or (robust)
when the value has 16 digits or more (a response cut off inside a run of
digits).  A response
with no marker at all that ends on a number is read by ``last_number``
without review; the rule name says it was a fallback.

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
_EXPONENT = re.compile(  # ^2, ^{2}, ^-1: dropped in robust mode, never read as an answer
    rf"\^[ \t]*(?:\{{[ \t]*[{_MINUS}]?\d+(?:\.\d+)?[ \t]*\}}|[{_MINUS}]?\d+(?:\.\d+)?)"
)

_LABEL = re.compile(
    r"(?:^[-*#>_ \t]*(?:final[ \t]+answer|answer|a)"  # at a line start, "A:" too
    r"|(?<=[.!?])[ \t]+(?:\*\*|__)?(?:final[ \t]+)?answer"  # starting a sentence
    r"|[ \t](?:\*\*|__)(?:final[ \t]+)?answer)"  # in bold
    r"[ \t]*(?:\*\*|__)?[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_PHRASE_SEED = re.compile(r"the (?:final |correct )?answer is")
_PHRASE_ROBUST = re.compile(
    r"\b(?:the[ \t]+)?(?:final[ \t]+|correct[ \t]+)?answer[ \t]+is(?![\w'\u2019])", re.IGNORECASE
)
_ASKED = (
    r"answer[ \t]+to[ \t]+(?:the|your|this|our)[ \t]+"
    r"(?:(?:original|first|asked|given|initial|main|actual)[ \t]+)?(?:question|problem)\b"
)
_ASKED_FORWARD = re.compile(
    rf"\b{_ASKED}(?:[ \t]+(?:you[ \t]+asked|asked|above|here|posed))?"
    r"[ \t]*,?[ \t]+(?:is|was)(?![\w'\u2019])",
    re.IGNORECASE,
)
_ASKED_BACKWARD = re.compile(rf"\b(?:is|was)[ \t]+(?:the[ \t]+)?{_ASKED}", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_MARKERS = (_BOXED, _LABEL, _PHRASE_ROBUST, _ASKED_FORWARD)

# A statement's words before its number: what makes it no statement of a value.
_HEDGE = re.compile(
    r"\b(?:not|no|never|neither|nor|either|between|unclear|unknown|undefined|impossible"
    r"|cannot|can['\u2019]t|unable|sorry|depends|depending|(?:more|less|fewer|greater)[ \t]+than"
    r"|at[ \t]+(?:least|most)|up[ \t]+to)\b",
    re.IGNORECASE,
)
# A letter choice: "(b)", or a capital A-E standing alone ("A" before a word is the article).
_CHOICE = re.compile(r"\([A-Ea-e]\)|\b(?:[B-E]|A(?![ \t]+[a-z]))\b")
_CHOICE_ONLY = re.compile(r"[\s:*_]*(?:\([A-Ea-e]\)|[A-E][).:]?)[\s:*_]*")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_CHAIN_GAP = re.compile(  # what joins the numbers of an arithmetic chain
    r"[ \t$()\[\]{}]*(?:(?:[-\u2212+*/x×÷·^=]|\\times|\\cdot|\\div)[ \t$()\[\]{}]*)+"
)
_RANGE_GAP = re.compile(r"[-\u2014]|[ \t]*\u2013[ \t]*|[ \t]+(?:to|or|and)[ \t]+", re.IGNORECASE)
_PHRASE_WORDS = 4  # words allowed between "the answer is" and its number
_CLAUSE_CHARS = 300  # how far back "N is the answer to your question" looks for N

_TITLE = (
    r"(?:\d+[.)][ \t]*)?"
    r"(?:(?:new|next|another|bonus|additional|similar|extra|follow-up|practice)[ \t]+)?"
    r"(?:question|problem|example|exercise|q)(?:[ \t]*#?\d+)?(?![\w'-])"
)
_NEW_TITLE = re.compile(
    rf"^[#*>_ \t]*{_TITLE}[ \t]*(?:\*\*|__)?[ \t]*(?:[:.)]|[*_ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)
_PROBLEM = r"(?:problem|question|exercise|example)s?(?![\w-])"
_OPENER = (  # words that lead into "another problem" without being part of a solution
    r"here|here['\u2019]s|is|let|let['\u2019]s|us|me|now|next|try|do|look|at|solve|consider|for|you"
    r"|give|i|i['\u2019]ll|will|move|moving|on|to|with|practice|take|ok|okay|shall|it['\u2019]s|time|up"
)
_NEW_SENTENCE = re.compile(
    r"(?:^|(?<=[.!?])[ \t])[#*>_ \t]*(?:"
    r"(?:now[ \t]*,?[ \t]+)?(?:try|solve|attempt)[ \t]+(?:this[ \t]+one\b|this(?=[ \t]*:)"
    rf"|the[ \t]+following[ \t]+{_PROBLEM}"
    rf"|(?:another|a[ \t]+(?:new|similar|different))[ \t]+(?:one\b|{_PROBLEM}))"
    r"|your[ \t]+turn\b"
    rf"|(?:(?:{_OPENER})[ \t,]+){{1,6}}(?:another|a[ \t]+(?:new|similar|different|related))[ \t]+"
    rf"(?:[a-z-]+[ \t]+)?{_PROBLEM})",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_LINK = re.compile(r"\b(?:is|are|was|were|equals?|total|be)\b|[=:]", re.IGNORECASE)
# Fractions, read as their value: written with an unspaced slash ("3/4"; "12 / 3" is a chain)
_SLASH_DEN = r"/(?P<den>\d+)(?![\d.,/])"  # a fraction's "/4": an unspaced slash and a whole number
_DENOMINATOR = re.compile(_SLASH_DEN)  # after a number read by a statement, ``####`` or a box
_LINE_FRACTION = re.compile(rf"(?<![\d.,/])(?:(?P<whole>\d+)[ \t]+)?(?P<num>\d+){_SLASH_DEN}")  # on the first line
_AFTER_OK = re.compile(r"[ \t]*(?:[A-Za-z]+(?:'[A-Za-z]+)?[ \t]*){0,3}[.!$* \t]*")

# Thousands written with a LaTeX thin space, "{,}", a Unicode (thin/no-break) space or an
# apostrophe ("90\,000", "90 000", "90'000"): made plain commas in robust mode.
_THOUSANDS_SEP = re.compile(r"(?<=\d)(?:\\,|\{,\}|[\u2009\u202f\u00a0'\u2019])(?=\d{3}(?!\d))")
# A magnitude word or suffix right after a number: "90 thousand", "1.5 million", "$90k".
_MAGNITUDE = re.compile(
    r"[ \t]*(?P<word>thousand|million|billion)\b|(?P<suffix>[kK])(?![\w'\u2019])", re.IGNORECASE
)
_SCALE = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "k": 1e3}
# Numbers in words, read only where a statement's value is spelled out ("The answer is twelve").
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORD = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * (i + 2) for i, w in enumerate(_TENS)}
_SPELLED_WORDS = "|".join(sorted(_UNITS + _TENS, key=len, reverse=True))
_WORD_NUMBER = re.compile(rf"(?:(?:{_SPELLED_WORDS}|hundred|thousand|million|and)\b|[ \t-])+", re.IGNORECASE)
# A concluding sentence: it opens with a concluding word, or has a ", so ..." clause.
_CONCLUDING = re.compile(
    r"^[#*>_ \t-]*(?:so|therefore|thus|hence|altogether|overall|finally"
    r"|in[ \t]+(?:total|all|the[ \t]+end|conclusion))\b"
    r"|[,;][ \t]+so\b(?![ \t]+(?:that|far)\b)",
    re.IGNORECASE,
)
_AFTER_WORDS = re.compile(r"[ \t]*(?:[A-Za-z]+[ \t]*){0,3}[*_ \t]*")
_NOT_UNITS = re.compile(r"\b(?:of|more|less|fewer|than|times|or|to|and|the|a|an|each|per|other)\b", re.I)
_SENTENCE = re.compile(r"[^\n]+?(?:[.!?](?=\s)|$)", re.MULTILINE)
_RESULT = re.compile(r"=[ \t$]*$")
_RESULT_LEAD_WORDS = 5  # a later "=" result led by this few words is working, not a remark
_PARENTHESES = re.compile(r"\([^()\n]*\)")
_CONCLUSION_TAIL = re.compile(r"[ \t]*(?:[A-Za-z]+(?:['\u2019][A-Za-z]+)?[ \t,]*){0,8}[.!*_ \t]*")
_CLAUSE_VERB = re.compile(  # a tail with its own verb is a new clause, not the value's units
    r"\b(?:is|are|was|were|will|would|can|could|has|have|had|do|does|did)\b", re.IGNORECASE
)
# An invented problem without a heading: a paragraph that sets up numbers and ends on a question.
_PARAGRAPH_START = re.compile(r"(?:\n[ \t]*\n|^[^\n]*#{4}[^\n]*\n)[ \t]*(?=\S)", re.MULTILINE)
_QUESTION = re.compile(r"\s*(?:how|what|who|which|when|find|calculate|determine|if)\b", re.IGNORECASE)
_WORKING = re.compile(  # a paragraph opening like this re-reads the asked problem or works on it
    r"[#*>_ \t-]*(?:wait|let|let['\u2019]s|check|checking|recall|remember|re-?read\w*|but|hmm|so|now|first|step"
    r"|we|to|the[ \t]+(?:question|problem)|in[ \t]+the[ \t]+(?:question|problem))\b",
    re.IGNORECASE,
)
_PARAGRAPH_CHARS = 1000  # how far an invented problem's paragraph is read


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


def _read(s: str, m: re.Match) -> float:
    """The number at ``m``, or the fraction it starts when an unspaced slash and a whole number follow
    ("3/4" -> 0.75)."""
    den = _DENOMINATOR.match(s, m.end())
    if den and int(den["den"]) != 0 and "%" not in m.group(0):
        return _to_float(m) / int(den["den"])
    return _to_float(m)


def _first_number(s: str) -> float | None:
    m = _NUM.search(s)
    return _to_float(m) if m else None


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def _normalize(text: str) -> str:
    """Robust mode's reading of written magnitudes: thousands separators other than a
    comma become commas, and a number followed by a magnitude word or ``k`` is written
    out ("90 thousand" -> "90000", "$1.5 million" -> "$1500000", "90\\,000" -> "90,000")."""
    text = _THOUSANDS_SEP.sub(",", text)
    out, last = [], 0
    for m in _NUM.finditer(text):
        scale = _MAGNITUDE.match(text, m.end())
        if scale is None or m.group(0).endswith("%"):
            continue
        factor = _SCALE[(scale["word"] or scale["suffix"]).lower()]
        value = float(m.group("body").replace(",", "")) * factor
        out += [text[last:m.start("body")], _number_text(value)]
        last = scale.end()
    return "".join(out) + text[last:]


def _words_value(s: str) -> float | None:
    """The number spelled out at the start of ``s`` ("forty-two", "one hundred and five",
    "twelve thousand"), or None."""
    m = _WORD_NUMBER.match(s)
    total = current = 0
    end = None
    for w in re.finditer(r"[a-z]+", m.group(0).lower()) if m else []:
        word = w.group(0)
        if word in _NUMBER_WORD:
            current, end = current + _NUMBER_WORD[word], w.end()
        elif word == "hundred" and end is not None:
            current, end = current * 100, w.end()
        elif word in ("thousand", "million") and end is not None:
            total, current, end = total + current * _SCALE[word], 0, w.end()
        elif word != "and" or end is None:
            break
    if end is None:
        return None
    tail = re.split(r"[.!?;,:(\n]", s[end:], maxsplit=1)[0]  # units at most: "twelve dollars."
    if not _AFTER_WORDS.fullmatch(tail) or _NOT_UNITS.search(tail):
        return None
    return float(total + current)


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


_BOX_RESULT = re.compile(r"=|\\approx|≈")  # what follows the last of these is the box's result
_BOX_OPERATOR = re.compile(r"\\times|\\cdot|\\div|[×÷*+]|\s[-−]\s")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def _boxed_value(content: str) -> float | None:
    """First number of LaTeX box content, after cleaning; fractions evaluated. An equation reads its
    right-hand side (``2 + 3 = 5``, ``x = 9``, ``\\frac{110}{3} \\approx 36.67``); an expression
    with words or unknowns in it (``70 \\times \\text{hours worked} + 105``) is no number."""
    s = content.replace("{,}", "").replace("\\,", "")
    s = s.replace("\\$", "").replace("\\%", "")
    s = _TEXT_WRAP.sub(r" \1 ", s)
    s = _BOX_RESULT.split(s)[-1]
    if _BOX_OPERATOR.search(s) and re.search(r"[A-Za-z]", _LATEX_COMMAND.sub(" ", s)):
        return None
    num, frac = _NUM.search(s), _FRAC.search(s)
    if frac and (num is None or frac.start() <= num.start()):
        try:
            value = parse_number(frac["num"]) / parse_number(frac["den"])
        except (ValueError, ZeroDivisionError):
            value = None
        if value is not None:
            return -value if frac["sign"] else value
    return _read(s, num) if num else None


def _last_hit(values) -> float | None:
    """Last non-None value of an iterable (the final statement counts)."""
    found = None
    for v in values:
        if v is not None:
            found = v
    return found


def _statements(pattern: re.Pattern, text: str):
    """(match, text after it up to the next match or the end of its line) for
    each match of ``pattern``: several statements on one line are read apart."""
    matches = list(pattern.finditer(text))
    for m, following in zip(matches, matches[1:] + [None]):
        stop = following.start() if following else len(text)
        newline = text.find("\n", m.end(), stop)
        yield m, text[m.end():stop if newline < 0 else newline]


def _statement_value(s: str, max_words: int | None = None) -> float | None:
    """The value a statement gives (module docs), or None."""
    nums = list(_NUM.finditer(s))
    lead = re.match(r"[\s:*_$]*", s).end()
    if not nums or nums[0].start() > lead:  # a value in words opens the statement: "is twelve"
        spelled = _words_value(s[lead:])
        if spelled is not None:
            return spelled
    if not nums or not _plain_lead(s[:nums[0].start()], max_words):
        return None
    return _chain_value(s, nums)


def _plain_lead(lead: str, max_words: int | None) -> bool:
    """Whether the words before a statement's number leave it a plain
    statement of that number: not hedged, not a letter choice, not too far."""
    if _HEDGE.search(lead) or (_CHOICE.search(lead) and not _CHOICE_ONLY.fullmatch(lead)):
        return False
    return max_words is None or len(_WORD.findall(_LATEX_CMD.sub(" ", lead))) <= max_words


def _chain_value(s: str, nums: list[re.Match]) -> float | None:
    """The first number, or the result after the last "=" of the arithmetic
    chain it starts ("3 × $4 = $12" -> 12); None for a range ("10-20")."""
    segments, prev, equals = [[nums[0]]], nums[0], False
    for m in nums[1:]:
        gap = s[prev.end():m.start()].replace("**", "").replace("\\$", "")
        if not _CHAIN_GAP.fullmatch(gap):
            break
        if "=" in gap:
            equals = True
            segments.append([])
        segments[-1].append(m)
        prev = m
    if equals:  # the result: the last side of an "=" that is one number ("12 = 3 * 4" -> 12)
        singles = [seg[0] for seg in segments if len(seg) == 1]
        return _to_float(singles[-1] if singles else segments[-1][0])
    if len(nums) > 1 and _RANGE_GAP.fullmatch(s[nums[0].end():nums[1].start()]):
        return None
    return _read(s, nums[0])


def _phrase_value(text: str) -> float | None:
    return _last_hit(_statement_value(s, _PHRASE_WORDS) for _, s in _statements(_PHRASE_ROBUST, text))


def _label_value(statement: str) -> float | None:
    """The label's own statement; but if it goes on to say "the answer is N"
    (one-line few-shot style ``A: ... The answer is 18.``), that N is the
    answer, not the first number of the reasoning."""
    phrased = _phrase_value(statement)
    return phrased if phrased is not None else _statement_value(statement)


def _clause_before(text: str, end: int) -> str:
    """From the start of the sentence (on its line, within a bounded window)
    that contains ``end`` to ``end``."""
    start = max(0, end - _CLAUSE_CHARS)
    newline = text.rfind("\n", start, end)
    clause = text[newline + 1 if newline >= 0 else start:end]
    ends = list(_SENTENCE_END.finditer(clause))
    return clause[ends[-1].end():] if ends else clause


def _asked_value(text: str) -> float | None:
    """Last sentence naming the answer to the asked question, either way round."""
    found = [(m.start(), _statement_value(s, _PHRASE_WORDS))
             for m, s in _statements(_ASKED_FORWARD, text)]
    for m in _ASKED_BACKWARD.finditer(text):
        nums = list(_NUM.finditer(_clause_before(text, m.start())))
        found.append((m.start(), _to_float(nums[-1]) if nums else None))
    return _last_hit(v for _, v in sorted(found, key=lambda hit: hit[0]))


def _truncate(text: str) -> str:
    """Cut where the model starts a problem of its own; only after a number
    has been written, so an opening restatement of the problem is kept."""
    first_number = _NUM.search(text)
    if first_number is None:
        return text
    cuts = (p.search(text, first_number.end()) for p in (_NEW_TITLE, _NEW_SENTENCE))
    starts = [m.start() for m in cuts if m]
    posed = _posed_problem(text, first_number.end())
    if posed is not None:
        starts.append(posed)
    return text[:min(starts)] if starts else text


def _posed_problem(text: str, after: int) -> int | None:
    """Start of the first paragraph (after a blank line or a ``####`` line) that poses a
    problem of the model's own without a title: it sets up numbers in a sentence and ends
    its line on a question ("Tom has 5 apples. He buys 3 more. How many ...?")."""
    for start in _PARAGRAPH_START.finditer(text, after):
        paragraph = re.split(r"\n[ \t]*\n", text[start.end():start.end() + _PARAGRAPH_CHARS], maxsplit=1)[0]
        ask = paragraph.find("?")
        if ask < 0 or not re.match(r"[ \t]*(?:\n|$)", paragraph[ask + 1:]) or _WORKING.match(paragraph):
            continue
        sentences = list(_SENTENCE_END.finditer(paragraph, 0, ask))
        setup = paragraph[:sentences[-1].end()] if sentences else ""
        if not (_NUM.search(setup) and _QUESTION.match(paragraph, sentences[-1].end() if sentences else 0)):
            continue
        before = text[:start.end()]  # only once the response has stated an answer
        if _HASHES.search(before) or any(p.search(before) for p in _MARKERS) or _conclusion_value(before) is not None:
            return start.end()
    return None


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
    fractions = list(_LINE_FRACTION.finditer(line))
    if len(fractions) == 1 and int(fractions[0]["den"]) != 0:  # "1/4", "2 1/2 cups": written as a decimal
        f = fractions[0]
        value = int(f["whole"] or 0) + int(f["num"]) / int(f["den"])
        line = line[:f.start()] + repr(value) + line[f.end():]
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


def _conclusion_value(text: str) -> float | None:
    """The value of the last concluding sentence ("So, she has 8 - 2 = 6 coins left.",
    "..., so he has 22 books now."): its last number (parenthesised working left out, the
    result of an "=" chain), followed by at most four words before the sentence ends."""
    found = None
    for sentence in _SENTENCE.finditer(text):
        s = sentence.group(0)
        concluding = _CONCLUDING.search(s)
        s = _PARENTHESES.sub(" ", s[concluding.start():] if concluding else s)
        nums = list(_NUM.finditer(s))
        if concluding and not nums:  # the value in words: "So, she has twenty-four apples left."
            spelled = _spelled_conclusion(s)
            if spelled is not None:
                found = spelled
            continue
        tail = s[nums[-1].end():] if nums else ""
        if not nums or not _CONCLUSION_TAIL.fullmatch(tail) or _CLAUSE_VERB.search(tail):
            continue
        if concluding:
            found = _to_float(nums[-1])
        elif _RESULT.search(s[:nums[-1].start()]) and (
                re.search(r"[A-Za-z$]", tail + (nums[-1]["prefix"] or ""))
                or len(_WORD.findall(s[:nums[-1].start()])) <= _RESULT_LEAD_WORDS):
            found = None  # a later result supersedes it: "= 138 flowers", "= $18", "She makes 9 * 2 = 18."
    return found


_SPELLED_RUN = re.compile(  # a number spelled out: "twenty-four", "one hundred and five"
    rf"\b(?:{_SPELLED_WORDS})\b(?:[ \t-]+(?:{_SPELLED_WORDS}|hundred|thousand|million|and)\b)*", re.IGNORECASE)


def _spelled_conclusion(sentence: str) -> float | None:
    """The last number spelled out in a concluding sentence without digits, with the tail a
    conclusion in digits may have and at most three words of units (``_words_value``); a lone "one"
    or "zero" ("no one", "each one") is no value."""
    runs = list(_SPELLED_RUN.finditer(sentence))
    if not runs or runs[-1].group(0).lower() in ("one", "zero"):
        return None
    tail = sentence[runs[-1].end():]
    if not _CONCLUSION_TAIL.fullmatch(tail) or _CLAUSE_VERB.search(tail):
        return None
    return _words_value(sentence[runs[-1].start():])


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


def _robust_rules(text: str) -> tuple[dict[str, float | None], bool]:
    """Every rule's value, and whether the text has an answer marker at all
    (so a marker that yields no number is not mistaken for plain reasoning)."""
    text = _EXPONENT.sub(" ", _truncate(_normalize(text)))
    hashes = (_NUM.match(text, m.end()) for m in _HASHES.finditer(text))
    last = list(_NUM.finditer(text))
    conclusion = _conclusion_value(text)
    if conclusion is not None and last and _same(conclusion, _to_float(last[-1])):
        conclusion = None  # the text ends on its conclusion: a plain last-number read
    results = {
        "asked_question": _asked_value(text),
        "boxed": _last_hit(_boxed_value(c) for c in _boxed_contents(text)),
        "hashes": _last_hit(_read(text, m) if m else None for m in hashes),
        "answer_label": _last_hit(_label_value(s) for _, s in _statements(_LABEL, text)),
        "answer_phrase": _phrase_value(text),
        "first_line": _robust_first_line(text),
        "conclusion": conclusion,
        "last_number": _to_float(last[-1]) if last else None,
    }
    return results, any(p.search(text) for p in _MARKERS)


_HUGE = 1e15  # 16 digits and more: beyond what a float holds exactly, and beyond any grade-school answer

_EXPLICIT = {
    "seed": ("boxed", "answer_phrase"),
    "robust": ("asked_question", "boxed", "hashes", "answer_label", "answer_phrase"),
}


def extract_details(text: str, mode: str = "robust") -> Extraction:
    """Extract the final answer and report which rule fired, what every rule
    would give, and whether a human should look at it (see module docs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    text = text or ""
    results, marked = (_seed_rules(text), False) if mode == "seed" else _robust_rules(text)
    candidates = {rule: v for rule, v in results.items() if v is not None}
    rule = next(iter(candidates), None)
    value = candidates[rule] if rule else None
    explicit = [candidates[r] for r in _EXPLICIT[mode] if r in candidates]
    disagree = any(not _same(a, b) for a in explicit for b in explicit)
    unread = marked and not explicit
    # a number longer than a float keeps (a response cut off inside a run of digits) is no answer to trust
    huge = mode == "robust" and value is not None and abs(value) >= _HUGE
    # a conclusion that is not the text's last number is read, but always shown to a human
    return Extraction(value, rule, candidates,
                      value is None or disagree or unread or huge or rule == "conclusion")


def extract_answer(text: str, mode: str = "robust") -> float | None:
    """The numeric final answer of ``text``, or None when none is found."""
    return extract_details(text, mode).value


def is_correct(pred: float | None, gold: float) -> bool:
    """Whether an extracted answer equals the gold one (to 1e-6, relative or absolute)."""
    return pred is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-6)
