"""Generated perception tasks for the offline demo, tests and `make compare`: questions answerable only from the image.

Rows come out in the loaders' format (`cppo_trl.data.loaders.convert_rows`), so a synthetic run goes through exactly the
code a real dataset does.
"""

import random
from collections.abc import Sequence
from typing import Any

import datasets
from PIL import Image as PILImage
from PIL import ImageDraw

from cppo_trl.data.loaders import DEFAULT_PROMPT_SUFFIX, convert_rows


SYNTHETIC_TASKS = ("color", "count", "position", "digit")
# A task where the text offers a tempting prior that the image must override (`make compare`): the question names the
# shape, and in training the shape predicts the colour asked for `PRIOR_STRENGTH` of the time; held-out rows
# (`make_synthetic_splits`' test split) draw the colour uniformly, breaking the link, and say whether they conflict.
PRIOR_TASK = "shape_color"
VALID_SYNTHETIC_TASKS = (*SYNTHETIC_TASKS, PRIOR_TASK)
SYNTHETIC_COLORS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (20, 60, 220), "yellow": (235, 200, 0)}
PRIOR_COLORS = {"circle": "red", "square": "green", "triangle": "blue"}  # yellow is never the prior's answer
PRIOR_STRENGTH = 0.8
_SYNTHETIC_QUESTIONS = {
    "color": "What is the color of the shapes in the image? Answer with one word: red, green, blue or yellow.",
    "count": "How many shapes are in the image? Answer with a single number.",
    "horizontal": "In which half of the image is the shape, horizontally? Answer with left or right.",
    "vertical": "In which half of the image is the shape, vertically? Answer with top or bottom.",
    "digit": "Which digit is drawn in the image? Answer with a single digit from 0 to 9.",
}
# Seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
_DIGIT_SEGMENTS = {
    "0": "abcdef",
    "1": "bc",
    "2": "abged",
    "3": "abgcd",
    "4": "fgbc",
    "5": "afgcd",
    "6": "afgedc",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: tuple[float, float], radius: float, color) -> None:
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=color)


def _grid_shapes(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    size: int,
    colors: list[tuple[int, int, int]],
    kind: str | None = None,
) -> None:
    """Draw one shape per colour in distinct cells of a 3x3 grid, so shapes never overlap and stay countable; each
    shape's kind is `kind`, or drawn at random."""
    cell = size / 3
    for slot, color in zip(rng.sample(range(9), len(colors)), colors, strict=True):
        center = ((slot % 3 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell, (slot // 3 + 0.5) * cell)
        shape = kind or rng.choice(("circle", "square", "triangle"))
        _draw_shape(draw, shape, center, cell * rng.uniform(0.28, 0.38), color)


def _draw_digit(draw: ImageDraw.ImageDraw, rng: random.Random, size: int, digit: str) -> None:
    width, height, thick = size * 0.4, size * 0.7, max(3.0, size * 0.09)
    x0 = (size - width) / 2 + rng.uniform(-0.08, 0.08) * size
    y0 = (size - height) / 2 + rng.uniform(-0.05, 0.05) * size
    mid = y0 + height / 2
    boxes = {
        "a": (x0, y0, x0 + width, y0 + thick),
        "b": (x0 + width - thick, y0, x0 + width, mid),
        "c": (x0 + width - thick, mid, x0 + width, y0 + height),
        "d": (x0, y0 + height - thick, x0 + width, y0 + height),
        "e": (x0, mid, x0 + thick, y0 + height),
        "f": (x0, y0, x0 + thick, mid),
        "g": (x0, mid - thick / 2, x0 + width, mid + thick / 2),
    }
    ink = (rng.randint(0, 60),) * 3
    for segment in _DIGIT_SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill=ink)


def _synthetic_row(rng: random.Random, task: str, size: int, held_out: bool = False) -> dict[str, Any]:
    """One image whose answer can only be read from the pixels; the question is the same for every answer, except for
    the prior task, whose question names the shape (`held_out` breaks the shape-colour link there)."""
    shade = rng.randint(225, 255)
    image = PILImage.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    question_key = task
    if task == PRIOR_TASK:
        kind = rng.choice(list(PRIOR_COLORS))
        prior = PRIOR_COLORS[kind]
        others = [color for color in SYNTHETIC_COLORS if color != prior]
        if held_out:
            answer = rng.choice(list(SYNTHETIC_COLORS))
        else:
            answer = prior if rng.random() < PRIOR_STRENGTH else rng.choice(others)
        _grid_shapes(draw, rng, size, [SYNTHETIC_COLORS[answer]], kind=kind)
        question = f"What is the color of the {kind} in the image? Answer with one word: red, green, blue or yellow."
        return {
            "question": question,
            "answer": answer,
            "image": image,
            "task": task,
            "prior_conflict": answer != prior,
        }
    if task == "color":
        answer = rng.choice(list(SYNTHETIC_COLORS))
        _grid_shapes(draw, rng, size, [SYNTHETIC_COLORS[answer]] * rng.randint(1, 3))
    elif task == "count":
        answer = str(rng.randint(1, 4))
        _grid_shapes(draw, rng, size, [rng.choice(list(SYNTHETIC_COLORS.values())) for _ in range(int(answer))])
    elif task == "position":
        question_key = rng.choice(("horizontal", "vertical"))
        answer = rng.choice(("left", "right") if question_key == "horizontal" else ("top", "bottom"))
        radius = size * 0.12
        along = rng.uniform(radius + 2, size / 2 - radius - 2)
        if answer in ("right", "bottom"):
            along = size - along
        across = rng.uniform(radius + 2, size - radius - 2)
        center = (along, across) if question_key == "horizontal" else (across, along)
        color = rng.choice(list(SYNTHETIC_COLORS.values()))
        _draw_shape(draw, rng.choice(("circle", "square", "triangle")), center, radius, color)
    else:
        answer = str(rng.randint(0, 9))
        _draw_digit(draw, rng, size, answer)
    return {
        "question": _SYNTHETIC_QUESTIONS[question_key],
        "answer": answer,
        "image": image,
        "task": task,
        "prior_conflict": False,
    }


def _synthetic_dataset(
    num_samples: int,
    rng: random.Random,
    image_size: int,
    tasks: Sequence[str],
    prompt_suffix: str | None,
    system_prompt: str | None,
    held_out: bool = False,
) -> datasets.Dataset:
    unknown = sorted(set(tasks) - set(VALID_SYNTHETIC_TASKS))
    if unknown or not tasks:
        raise ValueError(
            f"Unknown or empty synthetic tasks {unknown or list(tasks)}; valid: {list(VALID_SYNTHETIC_TASKS)}"
        )
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    rows = [_synthetic_row(rng, tasks[index % len(tasks)], image_size, held_out) for index in range(num_samples)]
    keep = ("task", "prior_conflict") if PRIOR_TASK in tasks else ("task",)
    return convert_rows(rows, keep_columns=keep, prompt_suffix=prompt_suffix, system_prompt=system_prompt)


def make_synthetic_perception_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = 112,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
) -> datasets.Dataset:
    """Generate the offline demo task: colour, count (1-4), position or a seven-segment digit, read off the image.

    Tasks alternate row by row; answers are drawn uniformly, so the small answer sets give an untrained policy some
    hits (reward variance). Deterministic for a seed; adds a `task` column. The prior task (`PRIOR_TASK`, not in the
    default mix) is drawn with its training prior here and adds a boolean `prior_conflict` column.
    """
    return _synthetic_dataset(num_samples, random.Random(seed), image_size, tasks, prompt_suffix, system_prompt)


def make_synthetic_splits(
    num_train: int,
    num_test: int,
    seed: int = 0,
    image_size: int = 112,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
) -> datasets.DatasetDict:
    """Train/test splits of the synthetic task drawn from one random stream, so they never replay the same draws.

    `train` equals `make_synthetic_perception_dataset(num_train, seed)`; `test` continues the stream, and for the prior
    task draws colours uniformly (the shape no longer predicts them; `prior_conflict` marks the rows where the shape's
    training colour is wrong).
    """
    rng = random.Random(seed)
    train = _synthetic_dataset(num_train, rng, image_size, tasks, prompt_suffix, system_prompt)
    test = _synthetic_dataset(num_test, rng, image_size, tasks, prompt_suffix, system_prompt, held_out=True)
    return datasets.DatasetDict({"train": train, "test": test})
