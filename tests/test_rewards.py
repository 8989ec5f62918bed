import pickle
import threading

import pytest

from cppo_trl.data.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    answer_match_reward,
    answers_match,
    extract_boxed,
    format_reward,
    get_reward_funcs,
    normalize_answer,
    partial_credit_reward,
    released_reward,
)


def _chat(text):
    return [{"role": "assistant", "content": text}]


def _accuracy(completion, solution):
    return accuracy_reward([completion], solution=[solution])[0]


@pytest.mark.parametrize(
    ("completion", "solution"),
    [
        (r"so \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{30^\circ}", "30"),
        (r"\boxed{30^{\circ}}", r"\boxed{30}"),
        (r"\boxed{30°}", "30"),
        (r"\boxed{30 degrees}", "30"),
        (r"\boxed{12 cm}", "12"),
        (r"\boxed{12\text{ cm}^2}", "12"),
        (r"\boxed{C}", "C"),
        (r"\boxed{C}", "(C)"),
        (r"\boxed{(c)}", "C"),
        (r"\boxed{C. 45}", "C"),
        (r"\boxed{B}", "B) the second option"),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
        (r"\boxed{2\sqrt{3}}", "2*sqrt(3)"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        (r"\boxed{$7$.}", "7"),
        (r"\boxed{\text{Yes}}", "yes"),
    ],
)
def test_accuracy_correct(completion, solution):
    assert _accuracy(completion, solution) == 1.0


@pytest.mark.parametrize(
    ("completion", "solution"),
    [
        (r"\boxed{3}", "4"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{A}", "(C)"),
        (r"\boxed{\sqrt{3}}", r"\sqrt{2}"),
        ("the answer is 4", "4"),  # no boxed answer
        ("", "4"),
        (r"\boxed{}", "4"),
        (r"\boxed{4", "4"),  # unclosed box
    ],
)
def test_accuracy_wrong_or_missing(completion, solution):
    assert _accuracy(completion, solution) == 0.0


def test_last_boxed_wins_and_nested_braces():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{\sqrt{4}}} end") == r"\frac{1}{\sqrt{4}}"
    assert extract_boxed("no box") is None
    assert _accuracy(r"\boxed{1} no wait \boxed{2}", "2") == 1.0
    assert _accuracy(r"\boxed{2} no wait \boxed{1}", "2") == 0.0
    assert _accuracy(r"\boxed{\frac{1}{2}}", r"\boxed{\frac{2}{4}}") == 1.0


def test_conversational_and_string_completions():
    completions = [r"<think>x</think> \boxed{5}", _chat(r"<think>x</think> \boxed{5}"), _chat(r"\boxed{6}")]
    structured = [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{5}"}]}]
    assert accuracy_reward(completions, solution=["5", "5", "5"]) == [1.0, 1.0, 0.0]
    assert accuracy_reward([structured], solution=["5"]) == [1.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0]


def test_accuracy_ignores_extra_trl_kwargs():
    rewards = accuracy_reward(
        [_chat(r"\boxed{5}")], solution=["5"], prompts=[[]], completion_ids=[[1]], trainer_state=None, qid=["q"]
    )
    assert rewards == [1.0]


def test_accuracy_outside_main_thread():
    """math_verify's signal-based timeout must be disabled in worker threads instead of raising."""
    results = []
    thread = threading.Thread(target=lambda: results.append(_accuracy(r"\boxed{\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_answers_match_survives_garbage():
    assert answers_match(r"\frac{{{", "1") is False
    assert answers_match("1/0", "1") is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>reasoning</think> The answer is \\boxed{5}.", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\\boxed{x}", 1.0),
        ("<think>reasoning</think> The answer is 5.", 0.0),
        ("The answer is \\boxed{5}.", 0.0),
        ("text <think>late</think> \\boxed{5}", 0.0),
        ("<think>a</think><think>b</think> \\boxed{5}", 0.0),
        ("<think>unclosed \\boxed{5}", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward([text]) == [expected]


def test_released_reward_weights():
    completions = [
        r"<think>ok</think> \boxed{5}",  # correct and formatted
        r"\boxed{5}",  # correct, unformatted
        r"<think>ok</think> \boxed{6}",  # formatted, wrong
        "nothing",
    ]
    assert released_reward(completions, solution=["5"] * 4) == pytest.approx([1.0, 0.9, 0.1, 0.0])


def test_answer_match_and_partial_credit():
    completions = [r"\boxed{Red}", "It is red.", "I think it is blue", "red or blue? \\boxed{blue}", "", "seven"]
    solutions = ["red", "red", "red", "red", "red", "7"]
    assert answer_match_reward(completions, solution=solutions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert partial_credit_reward(completions, solution=solutions) == pytest.approx([1.0, 1.0, 0.0, 0.6, 0.0, 1.0])
    assert partial_credit_reward(["maybe red, maybe green"], solution=["red"]) == [0.5]
    assert partial_credit_reward([r"\boxed{green}"], solution=["red"]) == pytest.approx([0.1])


def test_normalize_answer():
    assert normalize_answer(" (A) ") == "a"
    assert normalize_answer("A) 30 degrees") == "a"
    assert normalize_answer("$12\\,\\mathrm{cm}$.") == "12"
    assert normalize_answer("x = 5") == "x=5"
    assert normalize_answer("Three") == "3"


def test_registry_names_and_lookup():
    assert set(REWARD_FUNCS) == {"accuracy", "format", "cppo_released", "answer_match", "synthetic_partial"}
    for name, func in REWARD_FUNCS.items():
        assert func.__name__ == name  # TRL logs rewards/<__name__>/mean
    assert released_reward.__name__ == "cppo_released"
    assert get_reward_funcs(["cppo_released", "format"]) == [released_reward, format_reward]
    assert pickle.loads(pickle.dumps(released_reward)) is released_reward


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="valid names.*accuracy"):
        get_reward_funcs(["accuracy", "nope"])
