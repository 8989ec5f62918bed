"""Real datasets in TRL's conversational vision format: ViRL39K, Geometry3K, DeepEyes and local files, with the row
filters of the released run.

Every loader returns a `datasets.Dataset` with
- `prompt`: `[{"role": "user", "content": [...]}]` (after an optional system message), where the content holds a
  `{"type": "image"}` part exactly where the source text had an `<image>` placeholder and `{"type": "text"}` parts
  between them. Without placeholders, images come first, then the text (TRL's own convention);
- `images`: the row's images, a `List(Image(mode="RGB"))` feature. Images are stored as file paths (or as the
  encoded bytes the source already embeds) and decoded only when a row is accessed, so a 39k-row dataset does not
  hold decoded images in RAM;
- `solution`: the ground truth as the reward functions of `cppo_trl.data.rewards` read it.

All loaders share `convert_rows`, which validates every row (placeholder count, every image opens and decodes) and
either raises or drops invalid rows with a logged count per reason (`on_invalid`).
"""

import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow.parquet as pq
from huggingface_hub import snapshot_download
from PIL import Image as PILImage

from cppo_trl.core.images import to_rgb


logger = logging.getLogger(__name__)

DEFAULT_PROMPT_SUFFIX = (
    " You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"
# "default": image parts where the placeholders are, whitespace-only text dropped, the suffix on the last text part.
# "released": the authors' verl preprocessing (examples/data_preprocess/virl39k.py, recipe/cppo/cppo_dataset.py):
# "<image>\n" prepended when the question has no placeholder, the suffix appended to the whole string, then the
# string split at the placeholders keeping every non-empty segment, so the rendered prompt is theirs token for token.
PROMPT_LAYOUTS = ("default", "released")

OnInvalid = Literal["raise", "skip"]

_TEXT_PART = {"type": datasets.Value("string"), "text": datasets.Value("string")}
FEATURES = datasets.Features(
    {
        "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.List(_TEXT_PART)}),
        "images": datasets.List(datasets.Image(mode="RGB")),
        "solution": datasets.Value("string"),
    }
)


class _InvalidRow(Exception):
    """A row that fails validation; `reason` is the key of the skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def build_prompt(
    question: str,
    num_images: int,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    layout: str = "default",
) -> list[dict[str, Any]]:
    """Turn a question with `<image>` placeholders into TRL conversational messages with image parts in place.

    `layout` is one of `PROMPT_LAYOUTS` (see there). Raises ValueError when the text has placeholders but not
    exactly `num_images` of them.
    """
    if layout not in PROMPT_LAYOUTS:
        raise ValueError(f"prompt layout must be one of {PROMPT_LAYOUTS}, got {layout!r}")
    if layout == "released":
        return _released_prompt(question, num_images, prompt_suffix, system_prompt)
    segments = question.split(IMAGE_PLACEHOLDER)
    num_placeholders = len(segments) - 1
    if num_placeholders and num_placeholders != num_images:
        raise ValueError(f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)")
    if not num_placeholders:
        segments = [""] * num_images + [question]
    content: list[dict[str, str]] = []
    for position, segment in enumerate(segments):
        if position:
            content.append({"type": "image"})
        if segment.strip():
            content.append({"type": "text", "text": segment})
    if prompt_suffix:
        text_parts = [part for part in content if part["type"] == "text"]
        if text_parts:
            text_parts[-1]["text"] += prompt_suffix
        else:
            content.append({"type": "text", "text": prompt_suffix.lstrip()})
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages


def _released_prompt(
    question: str, num_images: int, prompt_suffix: str | None, system_prompt: str | None
) -> list[dict[str, Any]]:
    text = question if IMAGE_PLACEHOLDER in question else IMAGE_PLACEHOLDER + "\n" + question
    text += prompt_suffix or ""
    num_placeholders = text.count(IMAGE_PLACEHOLDER)
    if num_placeholders != num_images:
        raise ValueError(f"{num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)")
    content: list[dict[str, str]] = []
    for position, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            content.append({"type": "image"})
        if segment:
            content.append({"type": "text", "text": segment})
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages


def upscale_short_side(image: PILImage.Image, min_side: int) -> PILImage.Image:
    """The image with its short side raised to `min_side` px (LANCZOS, aspect kept, sides rounded), or unchanged.

    The authors' ViRL39K preprocessing does this with `min_side=28` so that no image is smaller than one merged
    Qwen vision token; the processor alone would instead round such a side up to 28 px and stretch the image.
    """
    width, height = image.size
    if min(width, height) >= min_side:
        return image
    scale = max(min_side / width, min_side / height)
    return image.resize((int(round(width * scale)), int(round(height * scale))), PILImage.Resampling.LANCZOS)


def _upscaled(encoded: dict[str, Any], min_side: int) -> dict[str, Any]:
    """Re-encode (lossless PNG) only the images that `upscale_short_side` changes; others stay file references."""
    with PILImage.open(io.BytesIO(encoded["bytes"]) if encoded["bytes"] is not None else encoded["path"]) as image:
        if min(image.size) >= min_side:
            return encoded
        buffer = io.BytesIO()
        upscale_short_side(image, min_side).save(buffer, format="PNG")
    return {"path": None, "bytes": buffer.getvalue()}


def _encode_image(source: Any, image_root: Path | None) -> dict[str, Any]:
    """Normalise an image value (path, `{"bytes", "path"}` dict, bytes or PIL image) to the `Image` feature's dict."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return {"path": None, "bytes": source["bytes"]}
        source = source.get("path")
    if isinstance(source, bytes | bytearray):
        return {"path": None, "bytes": bytes(source)}
    if isinstance(source, PILImage.Image):
        return datasets.Image().encode_example(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_absolute() and image_root is not None:
            path = image_root / path
        return {"path": str(path.absolute()), "bytes": None}
    raise _InvalidRow("unreadable_image", f"unsupported image value of type {type(source).__name__}")


def _check_image(encoded: dict[str, Any], position: int) -> None:
    """Open and fully decode one image so that a broken file fails here, not in the middle of training."""
    if encoded["bytes"] is None and not Path(encoded["path"]).is_file():
        raise _InvalidRow("missing_image", f"image {position} not found: {encoded['path']}")
    try:
        with PILImage.open(io.BytesIO(encoded["bytes"]) if encoded["bytes"] is not None else encoded["path"]) as image:
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
        where = encoded["path"] or "embedded bytes"
        raise _InvalidRow("unreadable_image", f"image {position} ({where}) cannot be decoded: {error}") from error


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def convert_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    image_column: str = "image",
    image_root: str | os.PathLike | None = None,
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    on_invalid: OnInvalid = "raise",
    max_images: int | None = None,
    min_image_side: int | None = None,
    prompt_layout: str = "default",
    num_workers: int = 8,
) -> datasets.Dataset:
    """Validate source rows and convert them to `prompt` / `images` / `solution` (+ `keep_columns`).

    A row is invalid when its answer is empty, it has no image, its `<image>` placeholders do not match its images,
    or an image is missing or does not decode. `on_invalid="raise"` raises a ValueError naming the row;
    `"skip"` drops it and logs the number of dropped rows per reason. `max_images` drops (and logs) rows with more
    images, as the released CPPO code does with multi-image rows. `min_image_side` upscales smaller images (see
    `upscale_short_side`); `prompt_layout` is passed to `build_prompt`. Images are checked in `num_workers` threads.
    """
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if prompt_layout not in PROMPT_LAYOUTS:
        raise ValueError(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {prompt_layout!r}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images!r}")
    if min_image_side is not None and min_image_side < 1:
        raise ValueError(f"min_image_side must be >= 1 or None, got {min_image_side!r}")
    rows = list(rows)
    required = [question_column, answer_column, image_column, *keep_columns] + ([id_column] if id_column else [])
    missing_columns = [column for column in required if rows and column not in rows[0]]
    if missing_columns:
        raise ValueError(f"Columns {missing_columns} not found; available columns: {sorted(rows[0])}")
    root = Path(image_root) if image_root is not None else None

    if max_images is not None:
        kept = [(index, row) for index, row in enumerate(rows) if len(_as_list(row[image_column])) <= max_images]
        if len(kept) < len(rows):
            logger.warning(
                "Dropped %d of %d rows with more than %d image(s)", len(rows) - len(kept), len(rows), max_images
            )
    else:
        kept = list(enumerate(rows))

    def convert(item: tuple[int, Mapping[str, Any]]) -> dict[str, Any] | tuple[int, _InvalidRow]:
        index, row = item
        try:
            answer = row[answer_column]
            if answer is None or not str(answer).strip():
                raise _InvalidRow("missing_answer", f"empty {answer_column!r}")
            images = [_encode_image(source, root) for source in _as_list(row[image_column])]
            if not images:
                raise _InvalidRow("no_images", f"no image in {image_column!r}")
            try:
                question = str(row[question_column] or "")
                prompt = build_prompt(question, len(images), prompt_suffix, system_prompt, layout=prompt_layout)
            except ValueError as error:
                raise _InvalidRow("placeholder_mismatch", str(error)) from error
            for position, encoded in enumerate(images):
                _check_image(encoded, position)
            if min_image_side is not None:
                images = [_upscaled(encoded, min_image_side) for encoded in images]
        except _InvalidRow as invalid:
            return index, invalid
        converted = {"prompt": prompt, "images": images, "solution": str(answer).strip()}
        converted.update({column: row[column] for column in keep_columns})
        return converted

    columns: dict[str, list[Any]] = {name: [] for name in [*FEATURES, *keep_columns]}
    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers))
    try:
        for result in pool.map(convert, kept):
            if isinstance(result, dict):
                for name, value in result.items():
                    columns[name].append(value)
                continue
            index, invalid = result
            label = f"row {index}" + (f" ({id_column}={rows[index][id_column]!r})" if id_column else "")
            if on_invalid == "raise":
                raise ValueError(f"Invalid {label}: {invalid} [{invalid.reason}]")
            skipped[invalid.reason] += 1
            examples.setdefault(invalid.reason, f"{label}: {invalid}")
    finally:
        pool.shutdown(cancel_futures=True)

    if skipped:
        logger.warning(
            "Skipped %d of %d rows (on_invalid='skip'): %s",
            sum(skipped.values()),
            len(kept),
            "; ".join(f"{reason}: {count} (e.g. {examples[reason]})" for reason, count in sorted(skipped.items())),
        )
    dataset = datasets.Dataset.from_dict({name: columns[name] for name in FEATURES}, features=FEATURES)
    for column in keep_columns:
        dataset = dataset.add_column(column, columns[column])
    return dataset


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet, JSON-lines or JSON (list of objects) file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
        return records
    raise ValueError(f"{path}: unsupported file type {suffix!r} (expected .parquet, .jsonl or .json)")


def load_local(
    path: str | os.PathLike,
    question_column: str = "question",
    answer_column: str = "answer",
    image_column: str = "image",
    image_root: str | os.PathLike | None = None,
    *,
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    on_invalid: OnInvalid = "raise",
    max_images: int | None = None,
    min_image_side: int | None = None,
    prompt_layout: str = "default",
    num_workers: int = 8,
) -> datasets.Dataset:
    """Load a local JSONL / JSON / parquet file whose image column holds paths (str or list) or embedded bytes.

    Relative image paths resolve against `image_root`, by default the file's folder.
    """
    path = Path(path)
    return convert_rows(
        read_records(path),
        question_column=question_column,
        answer_column=answer_column,
        image_column=image_column,
        image_root=image_root if image_root is not None else path.parent,
        id_column=id_column,
        keep_columns=keep_columns,
        prompt_suffix=prompt_suffix,
        system_prompt=system_prompt,
        on_invalid=on_invalid,
        max_images=max_images,
        min_image_side=min_image_side,
        prompt_layout=prompt_layout,
        num_workers=num_workers,
    )


def _extract_images_once(zip_path: Path, target: Path) -> None:
    """Extract `images.zip` into `target/images` through a staging folder, so an interrupted run leaves no half folder.

    Reading members straight from the zip (e.g. `zip://...::images.zip` paths) re-parses the 39k-entry central
    directory on every access (about a second per image), so the images are extracted once instead.
    """
    staging = target / ".images.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("Extracting %s into %s (done once)", zip_path, target / "images")
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging)
    (staging / "images" if (staging / "images").is_dir() else staging).rename(target / "images")
    shutil.rmtree(staging, ignore_errors=True)


def load_virl39k(
    path_or_id: str | os.PathLike = "TIGER-Lab/ViRL39K",
    split: str = "train",
    *,
    extract_dir: str | os.PathLike | None = None,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    on_invalid: OnInvalid = "raise",
    max_images: int | None = None,
    min_image_side: int | None = None,
    prompt_layout: str = "default",
    num_workers: int = 8,
) -> datasets.Dataset:
    """Load ViRL39K from the Hub (snapshot download) or a local folder with `39Krelease.parquet` and images.

    Images come from the folder's `images/` if present, else `images.zip` is extracted once into
    `extract_dir/images` (default: the dataset folder; pass `extract_dir` when that folder is read-only).
    ViRL39K ships a single split, so only `split="train"` exists. Keeps `qid`, `category` and `source`.
    The released CPPO preprocessing is `max_images=1, min_image_side=28, prompt_layout="released"`.
    """
    if split != "train":
        raise ValueError(f"ViRL39K has a single 'train' split, got {split!r}")
    folder = Path(path_or_id)
    if not folder.exists():
        folder = Path(snapshot_download(repo_id=str(path_or_id), repo_type="dataset"))
    parquet = folder / "39Krelease.parquet"
    if not parquet.is_file():
        raise FileNotFoundError(f"{parquet} not found")
    root = folder
    if not (folder / "images").is_dir():
        zip_path = folder / "images.zip"
        if not zip_path.is_file():
            raise FileNotFoundError(f"Neither {folder / 'images'} nor {zip_path} exists")
        root = Path(extract_dir) if extract_dir is not None else folder
        if not (root / "images").is_dir():
            root.mkdir(parents=True, exist_ok=True)
            _extract_images_once(zip_path, root)
    records = read_records(parquet)
    first = next((paths[0] for paths in (_as_list(r.get("image")) for r in records) if paths), None)
    if first is not None and not (root / first).exists() and (root / "images" / first).exists():
        root = root / "images"  # paths given relative to the images folder rather than the dataset folder
    return convert_rows(
        records,
        question_column="question",
        answer_column="answer",
        image_column="image",
        image_root=root,
        id_column="qid",
        keep_columns=("qid", "category", "source"),
        prompt_suffix=prompt_suffix,
        system_prompt=system_prompt,
        on_invalid=on_invalid,
        max_images=max_images,
        min_image_side=min_image_side,
        prompt_layout=prompt_layout,
        num_workers=num_workers,
    )


def parquet_split_files(path: Path, split: str) -> list[Path]:
    """Parquet files of one split in a Hub-style folder (`data/train-00000-of-00001.parquet`, `train.parquet`)."""
    if path.is_file():
        return [path]
    files = sorted(f for f in path.rglob("*.parquet") if f.stem == split or f.name.startswith(f"{split}-"))
    if not files:
        found = sorted(str(f.relative_to(path)) for f in path.rglob("*.parquet"))
        raise FileNotFoundError(f"No parquet file for split {split!r} under {path}; found {found}")
    return files


def load_geometry3k(
    path_or_id: str | os.PathLike = "hiyouga/geometry3k",
    split: str = "train",
    *,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    on_invalid: OnInvalid = "raise",
    max_images: int | None = None,
    min_image_side: int | None = None,
    prompt_layout: str = "default",
    num_workers: int = 8,
) -> datasets.Dataset:
    """Load Geometry3K (`images`, `problem`, `answer`) from the Hub or a local parquet file / folder.

    For a single local file `split` is ignored; for a folder it selects the files named after the split.
    """
    path = Path(path_or_id)
    if path.exists():
        rows: Iterable[Mapping[str, Any]] = [
            record for file in parquet_split_files(path, split) for record in read_records(file)
        ]
        image_root = path if path.is_dir() else path.parent
    else:
        hub_dataset = datasets.load_dataset(str(path_or_id), split=split)
        # Raw {"bytes", "path"} dicts: validation decodes them itself and the result keeps the encoded bytes.
        rows = hub_dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
        image_root = None
    return convert_rows(
        rows,
        question_column="problem",
        answer_column="answer",
        image_column="images",
        image_root=image_root,
        prompt_suffix=prompt_suffix,
        system_prompt=system_prompt,
        on_invalid=on_invalid,
        max_images=max_images,
        min_image_side=min_image_side,
        prompt_layout=prompt_layout,
        num_workers=num_workers,
    )


# --- DeepEyes ---------------------------------------------------------------------------------------------------

DEEPEYES_NAME = "ChenShawn/DeepEyes-Datasets-47k"
# The two files DeepEyes trains with its zoom-in tool (env_name "visual_toolbox_v2"): data_source "vstar" (V*-style
# high-resolution visual search) and "chart" (very large chart figures). Its third training file,
# data_thinklite_reasoning_acc.parquet (data_source "thinklite_eureka", maths, no tool), is left out by default.
DEEPEYES_TOOL_FILES = ("data_0.1.2_visual_toolbox_v2.parquet", "data_v0.8_visual_toolbox_v2.parquet")
# DeepEyes's own answer-format instruction (verl/workers/agent/envs/mm_process_engine/prompt.py, USER_PROMPT_V2 and
# TURN_PROMPT_V5): `<think>` / `<tool_call>` / `<answer>` tags. A question taken from the user message is cut there,
# so that only the recipe's `prompt_suffix` says how to answer.
_DEEPEYES_INSTRUCTIONS = ("\nThink first, call **image_zoom_in_tool**", "\nThink in the mind first, and then decide")


def _deepeyes_question(record: Mapping[str, Any]) -> str:
    """`extra_info.question` (what DeepEyes's judge reads), else the last user message without DeepEyes's format
    instruction (its `<image>` placeholders kept)."""
    extra = record.get("extra_info") or {}
    question = extra.get("question") if isinstance(extra, Mapping) else None
    if isinstance(question, str) and question.strip():
        return question.strip()
    messages = [m for m in _as_list(record.get("prompt")) if isinstance(m, Mapping) and m.get("role") == "user"]
    text = str(messages[-1].get("content") or "") if messages else ""
    for instruction in _DEEPEYES_INSTRUCTIONS:
        if instruction in text:
            text = text[: text.index(instruction)]
    return re.sub(rf"{re.escape(IMAGE_PLACEHOLDER)}\s+", IMAGE_PLACEHOLDER, text).strip()


def _deepeyes_records(records: Iterable[Mapping[str, Any]], source_file: str) -> list[dict[str, Any]]:
    """DeepEyes's verl rows -> the columns `convert_rows` reads; `reward_model.ground_truth` is the answer."""
    converted = []
    for record in records:
        reward_model = record.get("reward_model") or {}
        converted.append(
            {
                "question": _deepeyes_question(record),
                "answer": reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None,
                "images": _as_list(record.get("images")),
                "data_source": str(record.get("data_source") or ""),
                "env_name": str(record.get("env_name") or ""),
                "source_file": source_file,
            }
        )
    return converted


def load_deepeyes(
    path_or_id: str | os.PathLike = DEEPEYES_NAME,
    split: str = "train",
    *,
    files: Sequence[str] = DEEPEYES_TOOL_FILES,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    on_invalid: OnInvalid = "skip",
    max_images: int | None = None,
    min_image_side: int | None = None,
    prompt_layout: str = "default",
    num_workers: int = 8,
) -> datasets.Dataset:
    """Load DeepEyes's RL training data (verl parquet) in prompt/images/solution form.

    `path_or_id`: the Hub id (only `files` are downloaded), a local folder holding the files, or one parquet file
    (then `files` is ignored). DeepEyes ships a single training split. Each verl row has `data_source`, `prompt`
    (system message with DeepEyes's tool text, then the user message with an `<image>` placeholder and DeepEyes's
    `<answer>` instruction), `images` (a list of `{"bytes", "path"}`), `env_name`, `reward_model.ground_truth` and
    `extra_info` (with `question`); see docs/agents.md for where each was read. The prompt is rebuilt here: the
    question (`extra_info.question`) with the image first and the recipe's `prompt_suffix`; DeepEyes's system text is
    dropped, as TRL renders the tool schema of the environment itself. `solution` is `reward_model.ground_truth`;
    `data_source`, `env_name` and `source_file` are kept. Rows that fail validation are skipped by default (logged
    per reason), since a download of 47k scraped images may hold a few broken ones.
    """
    if split != "train":
        raise ValueError(f"DeepEyes has a single 'train' split, got {split!r}")
    path = Path(path_or_id)
    if path.is_file():
        parquet_files = [path]
    else:
        if not path.exists():
            path = Path(snapshot_download(repo_id=str(path_or_id), repo_type="dataset", allow_patterns=list(files)))
        parquet_files = [path / name for name in files]
        missing = [str(f) for f in parquet_files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"DeepEyes files not found: {missing}")
    records = [row for file in parquet_files for row in _deepeyes_records(read_records(file), file.name)]
    return convert_rows(
        records,
        question_column="question",
        answer_column="answer",
        image_column="images",
        keep_columns=("data_source", "env_name", "source_file"),
        prompt_suffix=prompt_suffix,
        system_prompt=system_prompt,
        on_invalid=on_invalid,
        max_images=max_images,
        min_image_side=min_image_side,
        prompt_layout=prompt_layout,
        num_workers=num_workers,
    )


# --- prompt-length filter ---------------------------------------------------------------------------------------


def prompt_token_counts(
    dataset: datasets.Dataset,
    processor: Any,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    num_proc: int | None = None,
) -> list[int]:
    """Tokens of every row's prompt exactly as the trainer feeds it to the model, image tokens included.

    Images go through `to_rgb` as the trainer's do, and the processor (with the recipe's pixel budget) resizes them as
    it does in training; the prompt is rendered the way TRL 1.16's `_tokenize_prompts` does it
    (`prepare_multimodal_messages`, then `processor.apply_chat_template(..., add_generation_prompt=True)`).
    """
    from trl.data_utils import prepare_multimodal_messages

    template_kwargs = dict(chat_template_kwargs or {})

    def count(row: dict[str, Any]) -> dict[str, int]:
        images = [to_rgb(image) for image in row.get("images") or []]
        messages = prepare_multimodal_messages(row["prompt"], images=images)
        encoded = processor.apply_chat_template(
            conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True, **template_kwargs
        )
        return {"prompt_tokens": len(encoded["input_ids"][0])}

    if len(dataset) == 0:
        return []
    counted = dataset.map(
        count, remove_columns=dataset.column_names, num_proc=num_proc, desc="Counting processed prompt tokens"
    )
    return list(counted["prompt_tokens"])


def drop_long_prompts(
    dataset: datasets.Dataset, counts: Sequence[int], max_tokens: int, split: str = "train"
) -> datasets.Dataset:
    """Keep the rows whose processed prompt has at most `max_tokens` tokens (verl's `filter_overlong_prompts`, which
    keeps `length <= max_prompt_length`), log how many were dropped, and raise if none is left."""
    if max_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_tokens!r}")
    if len(counts) != len(dataset):
        raise ValueError(f"{len(counts)} prompt lengths for {len(dataset)} rows of split {split!r}")
    keep = [index for index, count in enumerate(counts) if count <= max_tokens]
    if not keep:
        shortest = f"; the shortest processed prompt has {min(counts)} tokens" if counts else " (the split is empty)"
        raise ValueError(f"max_prompt_tokens={max_tokens} leaves no row of split {split!r}{shortest}")
    dropped = len(dataset) - len(keep)
    longest_kept = max(counts[index] for index in keep)
    if dropped:
        logger.warning(
            "Prompt-length filter, split %r: dropped %d of %d rows whose processed prompt exceeds %d tokens "
            "(longest kept %d, longest dropped %d)",
            split,
            dropped,
            len(dataset),
            max_tokens,
            longest_kept,
            max(counts),
        )
        return dataset.select(keep)
    logger.info(
        "Prompt-length filter, split %r: all %d rows within %d tokens (longest %d)",
        split,
        len(dataset),
        max_tokens,
        longest_kept,
    )
    return dataset
