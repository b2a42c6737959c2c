"""The prompting strategies of the study, as named, editable text.

Each strategy is a template for the user message with ``{question}`` (and, for
``gold-hint``, ``{solution}``). Edit ``STRATEGIES`` here, or pass ``templates=`` (from a
profile's ``prompts:`` mapping) to change or add one without touching the code.

The teacher sees a strategy prompt; the student always sees the plain question
(``student_messages``), in training and in assessment alike.
"""
from __future__ import annotations

STRATEGIES: dict[str, str] = {
    # no extra instruction: the question as it is
    "base": "{question}",
    # explain as a teacher guiding a student
    "teacher": (
        "You are a patient math teacher guiding a student. Explain how to solve the problem "
        "below step by step, saying why each step is taken, so that the student can follow "
        "the reasoning. Finish with the final answer.\n\n{question}"
    ),
    # the study's "Ground truth" row: a detailed answer meant for a smaller model to learn from
    "ai-to-ai": (
        "Your answer will be used as training data for a smaller AI model. Write a detailed, "
        "complete solution that a smaller model can learn from: state each quantity, write out "
        "every calculation, and end with the final answer.\n\n{question}"
    ),
    # double-check before answering
    "confidence": (
        "Solve the problem below step by step. Before you give the final answer, double-check "
        "each calculation and make sure the answer is correct.\n\n{question}"
    ),
    # the teacher is shown the reference solution
    "gold-hint": (
        "Here is a problem and a correct reference solution. Write your own clear step-by-step "
        "solution that reaches the same final answer, and finish with that answer.\n\n"
        "Problem: {question}\n\nReference solution:\n{solution}"
    ),
}


def strategy_names(templates: dict[str, str] | None = None) -> list[str]:
    return list({**STRATEGIES, **(templates or {})})


def render(strategy: str, question: str, solution: str | None = None,
           templates: dict[str, str] | None = None) -> str:
    """The user message of ``strategy`` for one problem."""
    table = {**STRATEGIES, **(templates or {})}
    if strategy not in table:
        raise ValueError(f"unknown prompting strategy {strategy!r}; known: {', '.join(table)}")
    template = table[strategy]
    if "{solution}" in template and not solution:
        raise ValueError(f"strategy {strategy!r} shows the reference solution, but none was given")
    return template.format(question=question.strip(), solution=(solution or "").strip())


def teacher_messages(strategy: str, question: str, solution: str | None = None,
                     templates: dict[str, str] | None = None) -> list[dict]:
    """Chat messages the teacher answers under ``strategy``."""
    return [{"role": "user", "content": render(strategy, question, solution, templates)}]


def student_messages(question: str) -> list[dict]:
    """What every student (and every model under assessment) sees: the plain question."""
    return [{"role": "user", "content": question.strip()}]
