"""How each benchmark's published schema maps to `cppo-eval`'s rows: one adapter per dataset card, plus the option
parsing they share. An adapter takes (source record, split, position in the split) and returns
`{"id", "question", "answer", "images", "options"}`; `cppo_trl.evaluate.benchmarks` turns those into prompted rows.
Schemas read from the dataset cards and the official releases (2026-11).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


Record = dict[str, Any]

_OPTION_MARKER = re.compile(r"(?:^|(?<=[\s;,]))(?:\(([A-H])\)|([A-H])[.:)])")
_OPTIONS_HEADER = re.compile(r"(?:choices|options)\s*:", re.IGNORECASE)
_NUMBERED_IMAGE_TAG = re.compile(r"\s*<image\d+>\s*")
MMMU_PRO_VISION_QUESTION = "Answer the multiple-choice question shown in the image."


def parse_inline_options(text: str | None) -> list[str]:
    """Option texts written into a question, in letter order: `(A) x (B) y`, `A: x\\nB: y`, `A. x; B. y`.

    Only a run of consecutive letters from A counts (a stray `A.` inside an option is not a marker); fewer than two
    options gives `[]` (the options are then only in the image, and only the letter can be checked).
    """
    if not text:
        return []
    header = _OPTIONS_HEADER.search(text)
    body = text[header.end() :] if header else text
    markers = [(m.start(), m.end(), m.group(1) or m.group(2)) for m in _OPTION_MARKER.finditer(body)]
    chosen: list[tuple[int, int]] = []
    expected = "A"
    for start, end, letter in markers:
        if letter == expected:
            chosen.append((start, end))
            expected = chr(ord(expected) + 1)
    if len(chosen) < 2:
        return []
    bounds = [*(start for start, _ in chosen[1:]), len(body)]
    return [body[end:stop].strip().rstrip(";,").strip() for (_, end), stop in zip(chosen, bounds, strict=True)]


def options_value(value: Any) -> list[str]:
    """An options column stored as a list, or as the string of a Python list (MMMU's convention)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return parse_inline_options(value)
    return [str(option) for option in value]


def _present(*images: Any) -> list[Any]:
    return [image for image in images if image is not None]


# --- adapters: one per published schema ---------------------------------------------------------------------------


def mathvista(row: Mapping[str, Any], split: str, index: int) -> Record:
    """AI4Math/MathVista: `query` is the benchmark's own prompt (hint, question, lettered choices); a multiple-choice
    `answer` is the option's text, `choices` the option texts."""
    multi_choice = row["question_type"] == "multi_choice"
    return {
        "id": str(row["pid"]),
        "question": row["query"],
        "answer": row["answer"],
        "images": _present(row["decoded_image"]),
        "options": list(row["choices"] or []) if multi_choice else None,
    }


def dynamath(row: Mapping[str, Any], split: str, index: int) -> Record:
    """DynaMath/DynaMath_Sample: one split per variant of the 501 seed questions; choices are in the question text."""
    multi_choice = row["answer_type"] == "multiple choice"
    return {
        "id": f"{row['id']}-v{split.removeprefix('sample_variant')}",
        "question": row["question"],
        "answer": row["ground_truth"],
        "images": _present(row["decoded_image"]),
        "options": parse_inline_options(row["question"]) if multi_choice else None,
    }


def wemath(row: Mapping[str, Any], split: str, index: int) -> Record:
    """We-Math/We-Math: `option` is one string `A. x; B. y; ...`, `answer` a letter, the image in `image_path`."""
    key = row.get("key")
    return {
        "id": f"{row['ID']}-{key}" if key else str(row["ID"]),
        "question": f"{row['question']}\nOptions: {row['option']}",
        "answer": row["answer"],
        "images": _present(row["image_path"]),
        "options": parse_inline_options(row["option"]),
    }


def mathvision(row: Mapping[str, Any], split: str, index: int) -> Record:
    """MathLLMs/MathVision: `<image1>` tags in the question (the image goes first instead), `options` as a list."""
    options = list(row["options"] or [])
    question = _NUMBERED_IMAGE_TAG.sub(" ", row["question"]).strip()
    if options:
        question += "\nChoices:\n" + "\n".join(f"({chr(ord('A') + i)}) {text}" for i, text in enumerate(options))
    return {
        "id": str(row["id"]),
        "question": question,
        "answer": row["answer"],
        "images": _present(row["decoded_image"]),
        "options": options or None,
    }


def mathverse(row: Mapping[str, Any], split: str, index: int) -> Record:
    """AI4Math/MathVerse testmini: `query_cot` is the benchmark's reasoning prompt (it also covers Vision Only
    problems, whose `question` is empty); multiple-choice options are in `question` or only in the image."""
    multi_choice = row["question_type"] == "multi-choice"
    return {
        "id": str(row["sample_index"]),
        "question": row["query_cot"],
        "answer": row["answer"],
        "images": _present(row["image"]),
        "options": parse_inline_options(row["question"]) if multi_choice else None,
    }


def mmmu_pro_vision(row: Mapping[str, Any], split: str, index: int) -> Record:
    """MMMU/MMMU_Pro `vision`: question and options are in the screenshot; `options` keeps their texts."""
    return {
        "id": str(row["id"]),
        "question": MMMU_PRO_VISION_QUESTION,
        "answer": row["answer"],
        "images": _present(row["image"]),
        "options": options_value(row["options"]),
    }


def logicvista(row: Mapping[str, Any], split: str, index: int) -> Record:
    """LogicVista release (`dataset.json`): answers are letters (`C`, `A, C`) or numbers; choices are in the image."""
    return {
        "id": str(row["id"]),
        "question": row["question"],
        "answer": row["answer"],
        "images": [row["imagename"]],
        "options": [],
    }


def read_logicvista(path: Path) -> tuple[list[dict[str, Any]], Path]:
    """The official release: `dataset.json` (an object keyed by question id) beside an `images/` folder."""
    file = path / "dataset.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"LogicVista: {file} not found (expected the release's data/dataset.json)")
    entries = json.loads(file.read_text(encoding="utf-8"))
    return [{"id": key, **value} for key, value in entries.items()], file.parent / "images"


def geometry3k(row: Mapping[str, Any], split: str, index: int) -> Record:
    """hiyouga/geometry3k: `problem` starts with `<image>`, `answer` is a short free-form value; rows have no id."""
    return {
        "id": str(index),
        "question": row["problem"],
        "answer": row["answer"],
        "images": list(row["images"] or []),
        "options": None,
    }
