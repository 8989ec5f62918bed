"""Rule-based reward functions for TRL's `GRPOTrainer` (and `CPPOTrainer`).

Every function follows TRL's custom-reward signature `f(completions, **kwargs) -> list[float | None]`. The ground
truth arrives as the `solution` keyword (the dataset column of that name, see `cppo_trl.data`). Completions may be
conversational (`[{"role": "assistant", "content": ...}]`) or plain strings.

TRL logs each reward under the function's `__name__`, so every registered function carries its registry name
(`rewards/accuracy/mean`, `rewards/cppo_released/mean`, ...).
"""

import functools
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from mathruler.grader import extract_boxed_content, grade_answer


logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float | None]]

# Released CPPO run (verl/recipe/cppo/reward.py, and verl's geo3k.compute_score that the launch script applies to
# ViRL39K: the same formula): reward = 0.9 * accuracy + 0.1 * format, where accuracy is mathruler's `grade_answer` on
# `extract_boxed_content` and format is this regex as a full match (no anchors needed).
RELEASED_ACCURACY_WEIGHT = 0.9
RELEASED_FORMAT_WEIGHT = 0.1
_RELEASED_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_RELEASED_BOXED = "\\boxed{"
# mathruler calls sympy.simplify without a time limit; one pathological answer must not stall a multi-day run.
RELEASED_GRADE_TIMEOUT_S = 10.0

# math_verify guards sympy with a signal.alarm timeout; signals only work in the main thread.
MATH_VERIFY_TIMEOUT_S = 5
_MATH_VERIFY_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

_BOXED_START = re.compile(r"\\boxed\s*\{")
_FORMAT_PATTERN = re.compile(r"^\s*<think>.*?</think>.*\\boxed\{.*\}.*$", re.DOTALL)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\bdegrees?\b")
_UNIT = re.compile(
    r"(?<=\d)\s*(?:cm|mm|km|m|in|inch|inches|ft|feet|yd|yards?|units?|sq\.?\s*units?|square\s+units?|meters?|"
    r"centimeters?|kilometers?)(?:\s*\^\s*\{?\s*[23]\s*\}?)?$"
)
_CHOICE = re.compile(r"^(?:\(([a-z])\)|([a-z])[.:)])(?:\s.*)?$|^([a-z])$", re.DOTALL)
_WORD = re.compile(r"[A-Za-z0-9]+")
_PLAIN_WORDS = re.compile(r"^[A-Za-z]+(?: [A-Za-z]+)*$")
_LETTER_SET = re.compile(r"^\(?[a-z]\)?(?:\s*(?:,|and|&)\s*\(?[a-z]\)?)+$")
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
}


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """Return the text of a completion, whether TRL passed a plain string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    texts = []
    for message in completion:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):  # structured parts, e.g. [{"type": "text", "text": ...}]
            texts.append("".join(part.get("text") or "" for part in content if part.get("type") == "text"))
    return "\n".join(texts)


def extract_boxed(text: str) -> str | None:
    """Return the content of the last complete `\\boxed{...}` in `text` (balanced braces), or None."""
    for match in reversed(list(_BOXED_START.finditer(text))):
        depth = 1
        for pos in range(match.end(), len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : pos].strip()
    return None


def normalize_answer(answer: str) -> str:
    """Canonical string form of a short answer, for the cheap exact-match path of `answers_match`.

    Drops `$`, `\\text{}`-style wrappers, degree signs, trailing units after a number, spaces, case and a final
    period; reduces a multiple-choice answer (`A`, `(A)`, `A.`, `A) text`) to its letter and a number word to digits.
    """
    text = answer.strip().replace("$", "")
    previous = None
    while previous != text:  # unwrap nested \text{\mathrm{...}}
        previous, text = text, _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\[,;:! ]", " ", text)
    text = _DEGREES.sub("", text).strip().rstrip(".").strip().lower()
    text = _UNIT.sub("", text).strip()
    choice = _CHOICE.match(text)
    if choice:
        return next(group for group in choice.groups() if group)
    text = re.sub(r"\s+", "", text)
    return _NUMBER_WORDS.get(text, text)


@functools.lru_cache(maxsize=1 << 16)  # pure in its strings; sympy takes ~10-60 ms a call, and answers repeat a lot
def _math_equal(prediction: str, gold: str) -> bool:
    """Symbolic equivalence via math_verify; any parser failure or timeout counts as "not equal"."""
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(
            f"${gold.replace('$', '')}$", extraction_config=_MATH_VERIFY_CONFIG, parsing_timeout=timeout
        )
        pred_parsed = parse(
            f"${prediction.replace('$', '')}$", extraction_config=_MATH_VERIFY_CONFIG, parsing_timeout=timeout
        )
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math_verify/sympy can fail in many ways on model output; a crash must not stop training
        logger.debug("math_verify failed on prediction=%r gold=%r", prediction, gold, exc_info=True)
        return False


def answers_match(prediction: str, gold: str) -> bool:
    """True when `prediction` equals `gold` after normalisation or is mathematically equivalent to it.

    Two plain words never go to math_verify: sympy reads them as products of symbols ('sey' == 'yes').
    """
    if not prediction.strip() or not gold.strip():
        return False
    if normalize_answer(prediction) == normalize_answer(gold):
        return True
    if _PLAIN_WORDS.match(prediction.strip()) and _PLAIN_WORDS.match(gold.strip()):
        return False
    return _math_equal(prediction, gold)


def _choice_letters(answer: str) -> frozenset[str] | None:
    """The option letter(s) an answer names: `B`, `(B)`, `B. text` -> {b}; `A, C` / `A and C` -> {a, c}; else None."""
    normalized = normalize_answer(answer)
    if len(normalized) == 1 and "a" <= normalized <= "z":
        return frozenset(normalized)
    text = answer.strip().replace("$", "").lower()
    if _LETTER_SET.match(text):
        return frozenset(re.findall(r"[a-z]", re.sub(r"\band\b", ",", text)))
    return None


def choice_matches(prediction: str, gold: str, options: Sequence[str]) -> bool:
    """Multiple-choice check: the prediction names the gold option by its letter(s), or gives the gold option's text.

    `gold` is the gold letter(s) (`B`, `A, C`) or the gold option's text (MathVista stores the text); `options` are
    the option texts in letter order (`options[0]` is A), empty when the options exist only in the image. A prediction
    that names a letter is judged by its letter alone (`\\boxed{A. 145°}` is A, whatever the text says).
    """
    if not prediction.strip() or not gold.strip():
        return False
    gold_letters = _choice_letters(gold)
    if gold_letters is None:  # the gold is an option's text: find its letter
        index = next((i for i, text in enumerate(options) if answers_match(str(text), gold)), None)
        if index is None:
            return answers_match(prediction, gold)
        gold_letters = frozenset(chr(ord("a") + index))
    predicted_letters = _choice_letters(prediction)
    if predicted_letters is not None:
        return predicted_letters == gold_letters
    if len(gold_letters) == 1:
        index = ord(next(iter(gold_letters))) - ord("a")
        return index < len(options) and answers_match(prediction, str(options[index]))
    return False


def _gold_answer(solution: Any) -> str:
    """Solutions may be stored boxed (ViRL39K) or bare (Geometry3K)."""
    text = "" if solution is None else str(solution)
    boxed = extract_boxed(text)
    return text if boxed is None else boxed


def _accuracy(text: str, solution: Any, options: Sequence[str] | None = None) -> float:
    prediction = extract_boxed(text)
    if prediction is None:
        return 0.0
    gold = _gold_answer(solution)
    return float(answers_match(prediction, gold) if options is None else choice_matches(prediction, gold, options))


def _format(text: str) -> float:
    one_think_block = text.count("<think>") == 1 and text.count("</think>") == 1
    return float(one_think_block and _FORMAT_PATTERN.match(text) is not None)


def _final_answer(text: str) -> str:
    """The last `\\boxed{}` answer if there is one, else the last alphanumeric word."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    words = _WORD.findall(text)
    return words[-1] if words else ""


def _named(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Set the name TRL logs the reward under; `__qualname__` is kept so the function still pickles."""

    def decorator(func: RewardFunc) -> RewardFunc:
        func.__name__ = name
        return func

    return decorator


@_named("accuracy")
def accuracy_reward(
    completions: Sequence, solution: Sequence, options: Sequence | None = None, **kwargs
) -> list[float | None]:
    """1.0 when the last `\\boxed{}` answer matches the solution (normalised string or math_verify), else 0.0.

    An optional `options` column makes a row multiple-choice (`choice_matches`: the letter or the option text count);
    rows whose `options` is None are free-form.
    """
    options = [None] * len(completions) if options is None else options
    return [_accuracy(completion_text(c), s, o) for c, s, o in zip(completions, solution, options, strict=True)]


@_named("format")
def format_reward(completions: Sequence, **kwargs) -> list[float | None]:
    """1.0 for exactly one leading `<think>...</think>` block followed by a `\\boxed{}` answer, else 0.0."""
    return [_format(completion_text(c)) for c in completions]


@_named("cppo_released")
def released_reward(completions: Sequence, solution: Sequence, **kwargs) -> list[float | None]:
    """The released CPPO reward, scored exactly as `verl/recipe/cppo/reward.py`: 0.9 * mathruler accuracy + 0.1 *
    full-match format (see `released_accuracy`, `released_format`). Not the paper preset's `accuracy`/`format`."""
    texts = [completion_text(c) for c in completions]
    return [
        RELEASED_ACCURACY_WEIGHT * released_accuracy(text, s) + RELEASED_FORMAT_WEIGHT * released_format(text)
        for text, s in zip(texts, solution, strict=True)
    ]


class _GradeTimeout(Exception):
    """Raised by the interval timer inside mathruler's grading."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[list[bool]]:
    """Yields a flag list that holds True once `seconds` of wall time passed (main thread only; elsewhere no limit).

    The alarm raises inside whatever mathruler is doing; mathruler's own bare `except:` clauses swallow it and it then
    answers "not equal" at once, so the flag (not the exception) tells the caller that the grade is unreliable.
    """
    fired = [False]
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield fired
        return

    def on_alarm(signum, frame):
        fired[0] = True
        raise _GradeTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    except _GradeTimeout:
        fired[0] = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def released_ground_truth(solution: Any) -> str:
    """The authors' ground truth: `extract_boxed_content(answer)` for boxed answers (their ViRL39K preprocessing,
    which yields "None" for an unbalanced box, as theirs), the answer itself otherwise (their Geometry3K)."""
    text = "" if solution is None else str(solution)
    return extract_boxed_content(text) if _RELEASED_BOXED in text else text


def released_accuracy(text: str, solution: Any) -> float:
    """1.0 when mathruler grades the last `\\boxed{...}` of `text` equal to the ground truth, as the released code.

    No box, an unbalanced last box or `\\boxed {` (with a space) extract the string "None", as in mathruler. A grade
    that exceeds `RELEASED_GRADE_TIMEOUT_S` scores 0.0 with a warning, and one that raises scores 0.0 (the authors'
    code would block or crash there; on every input where it returns, the score is theirs).
    """
    prediction, gold = extract_boxed_content(text), released_ground_truth(solution)
    correct = False
    with _time_limit(RELEASED_GRADE_TIMEOUT_S) as timed_out:
        try:
            correct = grade_answer(prediction, gold)
        except Exception:  # mathruler parses model output with sympy; a crash must not stop training (scores 0)
            logger.debug("mathruler failed on prediction=%r gold=%r", prediction, gold, exc_info=True)
    if timed_out[0]:
        logger.warning(
            "mathruler grading exceeded %.0f s: scored 0 (prediction=%r, gold=%r)",
            RELEASED_GRADE_TIMEOUT_S,
            prediction[:200],
            gold[:200],
        )
        return 0.0
    return float(bool(correct))


def released_format(text: str) -> float:
    """1.0 when `text` fully matches `<think>.*</think>.*\\boxed\{.*\}.*` (DOTALL), as the released code: it must
    start with `<think>` (no leading whitespace) and may hold several think blocks."""
    return float(_RELEASED_FORMAT.fullmatch(text) is not None)


@_named("answer_match")
def answer_match_reward(completions: Sequence, solution: Sequence, **kwargs) -> list[float | None]:
    """1.0 when the final answer (boxed, else last word) equals the solution after normalisation, else 0.0.

    String-only (no math_verify): meant for short categorical answers such as the synthetic perception task.
    """
    return [
        float(normalize_answer(_final_answer(completion_text(c))) == normalize_answer(_gold_answer(s)))
        for c, s in zip(completions, solution, strict=True)
    ]


@_named("synthetic_partial")
def partial_credit_reward(completions: Sequence, solution: Sequence, **kwargs) -> list[float | None]:
    """Dense reward for the synthetic perception task, so an untrained policy already sees reward variance.

    1.0 when the final answer matches (as `answer_match`); otherwise 0.5 if the answer appears as a word anywhere in
    the completion, plus 0.1 if the completion contains a complete `\\boxed{}`. Non-exact answers score at most 0.6,
    so committing to the right answer always pays more than listing every option.
    """
    rewards = []
    for exact, completion, gold in zip(answer_match_reward(completions, solution), completions, solution, strict=True):
        if exact:
            rewards.append(1.0)
            continue
        text = completion_text(completion)
        words = {normalize_answer(word) for word in _WORD.findall(text)}
        mentioned = normalize_answer(_gold_answer(gold)) in words
        rewards.append(0.5 * mentioned + 0.1 * (extract_boxed(text) is not None))
    return rewards


REWARD_FUNCS: dict[str, RewardFunc] = {
    func.__name__: func
    for func in (accuracy_reward, format_reward, released_reward, answer_match_reward, partial_credit_reward)
}


def get_reward_funcs(names: Sequence[str]) -> list[RewardFunc]:
    """Look reward functions up by registry name (as written in recipes / CLI flags)."""
    unknown = [name for name in names if name not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"Unknown reward function(s) {unknown}; valid names: {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[name] for name in names]
