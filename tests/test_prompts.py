import pytest

from helpers import prompts

Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SOL = "3 + 4 = 7\n#### 7"


@pytest.mark.parametrize("strategy", ["base", "teacher", "ai-to-ai", "confidence", "gold-hint"])
def test_every_strategy_contains_the_question(strategy):
    text = prompts.render(strategy, Q, SOL)
    assert Q in text
    assert (SOL in text) == (strategy == "gold-hint")


def test_base_is_the_plain_question_and_strategies_differ():
    assert prompts.render("base", "  " + Q + "\n") == Q
    texts = {s: prompts.render(s, Q, SOL) for s in prompts.STRATEGIES}
    assert len(set(texts.values())) == len(texts)


def test_student_sees_the_plain_question():
    assert prompts.student_messages(Q) == [{"role": "user", "content": Q}]
    assert prompts.teacher_messages("base", Q) == prompts.student_messages(Q)


def test_errors_and_custom_templates():
    with pytest.raises(ValueError, match="unknown prompting strategy 'socratic'"):
        prompts.render("socratic", Q)
    with pytest.raises(ValueError, match="reference solution"):
        prompts.render("gold-hint", Q)
    custom = {"terse": "Answer with a number only.\n{question}", "base": "Q: {question}"}
    assert prompts.render("terse", Q, templates=custom).endswith(Q)
    assert prompts.render("base", Q, templates=custom) == f"Q: {Q}"
    assert "terse" in prompts.strategy_names(custom)
    assert prompts.render("base", Q) == Q  # the module's table is untouched
