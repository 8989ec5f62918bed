"""The `accuracy` reward as the evaluator uses it (looked up by registry name): free-form rows as in training, and
multiple-choice rows (an `options` column) accepting the letter or the gold option's text."""

import pytest

from cppo_trl.data.rewards import REWARD_FUNCS, choice_matches


ACCURACY = REWARD_FUNCS["accuracy"]
ANGLES = ["130°", "145°", "165°", "175°"]


def score(completion, solution, options=None):
    return ACCURACY([completion], solution=[solution], options=[options])[0]


@pytest.mark.parametrize(
    ("completion", "solution", "options", "expected"),
    [
        # letter gold, option texts known
        (r"<think>...</think> \boxed{B}", "B", ANGLES, 1.0),
        (r"\boxed{(B)}", "B", ANGLES, 1.0),
        (r"\boxed{B. 145°}", "B", ANGLES, 1.0),
        (r"\boxed{145°}", "B", ANGLES, 1.0),
        (r"\boxed{145^{\circ}}", "B", ANGLES, 1.0),
        (r"\boxed{\text{145 degrees}}", "B", ANGLES, 1.0),
        (r"\boxed{C}", "B", ANGLES, 0.0),
        (r"\boxed{165°}", "B", ANGLES, 0.0),
        (r"\boxed{A. 145°}", "B", ANGLES, 0.0),  # names another letter
        ("The answer is B", "B", ANGLES, 0.0),  # unboxed
        (r"\boxed{B", "B", ANGLES, 0.0),  # unclosed
        # the gold stored as the option's text (MathVista)
        (r"\boxed{B}", "145°", ANGLES, 1.0),
        (r"\boxed{145}", "145°", ANGLES, 1.0),
        (r"\boxed{A}", "145°", ANGLES, 0.0),
        # LaTeX forms of an option's text
        (r"\boxed{\frac{1}{2}}", "C", ["1", "2", "0.5"], 1.0),
        (r"\boxed{2\sqrt{3}}", "A", ["2*sqrt(3)", "3"], 1.0),
        (r"\boxed{\dfrac{3}{4}}", "A", ["0.75", "0.5"], 1.0),
        # options only in the image: the letter(s) alone
        (r"\boxed{D}", "D", [], 1.0),
        (r"\boxed{the fourth}", "D", [], 0.0),
        (r"\boxed{A, C}", "A, C", [], 1.0),
        (r"\boxed{C and A}", "A, C", [], 1.0),
        (r"\boxed{A}", "A, C", [], 0.0),
        (r"\boxed{3}", "3", [], 1.0),  # 'select from 1-5' questions keep a numeric gold
    ],
)
def test_multiple_choice(completion, solution, options, expected):
    assert score(completion, solution, options) == expected


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{12\sqrt{2}}", "12\\sqrt{2}", 1.0),
        (r"\boxed{30^\circ}", "30", 1.0),
        (r"\boxed{3}", "4", 0.0),
        ("4", "4", 0.0),
        (r"\boxed{sey}", "yes", 0.0),  # sympy would call the two products of symbols equal
        (r"\boxed{Yes.}", "yes", 1.0),
    ],
)
def test_free_form_rows_are_unchanged(completion, solution, expected):
    assert score(completion, solution, None) == expected
    assert ACCURACY([completion], solution=[solution])[0] == expected  # no options column at all: training's path


def test_mixed_batch_and_conversational_completions():
    completions = [[{"role": "assistant", "content": r"\boxed{B}"}], r"\boxed{0.5}", r"\boxed{B}"]
    assert ACCURACY(completions, solution=["B", "1/2", "0.5"], options=[ANGLES, None, None]) == [1.0, 1.0, 0.0]


def test_choice_matches_direct():
    assert choice_matches("b", "B", ["x", "y"])
    assert not choice_matches("", "B", ["x", "y"])
    assert not choice_matches("y", "", ["x", "y"])
    assert choice_matches("seven", "7", [])  # gold text not among options: plain comparison
