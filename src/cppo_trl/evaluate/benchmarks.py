"""Evaluation benchmarks as a registry: the paper's Table 1 sets, Geometry3K test, the synthetic task, local files.

Every benchmark loads into one row format, a `datasets.Dataset` built by `cppo_trl.data.loaders.convert_rows` — so a question
is prompted exactly like a training row (its images in place, then the recipe's instruction) and every image is
checked before any generation starts — with the columns
- `prompt`, `images`, `solution` (`cppo_trl.data.loaders.FEATURES`);
- `id`: unique within the benchmark (resumption and per-sample seeds key on it);
- `options`: the option texts in letter order for a multiple-choice question (`[]` when they exist only in the image),
  None for a free-form one: the `accuracy` reward's multiple-choice switch (`cppo_trl.data.rewards.choice_matches`).

An entry reads a Hub dataset (`datasets.load_dataset`) or a local copy of the same files (`--benchmark_paths
name=path`); its `adapt` (`cppo_trl.evaluate.schemas`, one per published schema) maps a source record to (id,
question, answer, images, options). `subset` and `differences` are what the README reports per entry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from cppo_trl.data import loaders
from cppo_trl.evaluate import schemas
from cppo_trl.evaluate.schemas import Record


logger = logging.getLogger(__name__)

# (source record, split, position in the split) -> {"id", "question", "answer", "images", "options"}
Adapter = Callable[[Mapping[str, Any], str, int], Record]


@dataclass(frozen=True)
class Benchmark:
    """One registry entry: where the data is, how a record maps to a row, and how it differs from the paper's run."""

    name: str
    title: str  # column header, as the paper's Table 1 names it
    adapt: Adapter
    subset: str
    differences: str
    hub_id: str | None = None
    config: str | None = None
    splits: tuple[str, ...] = ("test",)  # concatenated in order (DynaMath: its ten variants)
    local_subdir: str | None = None  # where the split files sit in a local copy of the Hub repository
    split_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file-name prefixes per split, if not it
    read_local: Callable[[Path], tuple[list[dict[str, Any]], Path]] | None = None  # non-parquet layouts


_VLMEVAL = (
    "the paper's VLMEvalKit run extracts answers with GPT-4o-mini; ours reads the last \\boxed{} (unboxed = wrong)"
)
REGISTRY: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "mathvista",
            "MathVista-mini",
            schemas.mathvista,
            hub_id="AI4Math/MathVista",
            splits=("testmini",),
            subset="testmini, 1,000 questions; prompt = the dataset's `query` (hint + choices)",
            differences=f"same 1,000 questions as VLMEvalKit MathVista_MINI; {_VLMEVAL}",
        ),
        Benchmark(
            "dynamath",
            "DynaMath",
            schemas.dynamath,
            hub_id="DynaMath/DynaMath_Sample",
            splits=tuple(f"sample_variant{n}" for n in range(1, 11)),
            split_files={f"sample_variant{n}": (f"sample_variant{n}", f"sample{n}") for n in range(1, 11)},
            subset="all 10 variants of the 501 seed questions (5,010 rows)",
            differences=f"VLMEvalKit's 'Overall' is the same average over 5,010 rows; {_VLMEVAL}; "
            "DynaMath's worst-case (all-variants) accuracy is not reported",
        ),
        Benchmark(
            "wemath",
            "WeMath",
            schemas.wemath,
            hub_id="We-Math/We-Math",
            splits=("testmini",),
            subset="testmini, 1,740 one- and multi-step questions",
            differences="the paper reports VLMEvalKit's 'Score (Strict)', WeMath's four-way composite over problem "
            "decompositions; ours is plain per-question accuracy: not comparable in absolute value",
        ),
        Benchmark(
            "mathvision",
            "MathVision-mini",
            schemas.mathvision,
            hub_id="MathLLMs/MathVision",
            splits=("testmini",),
            subset="testmini, 304 questions; `<imageN>` tags removed (the image goes first)",
            differences=f"same 304 questions as VLMEvalKit MathVision_MINI; {_VLMEVAL}",
        ),
        Benchmark(
            "mathverse",
            "MathVerse",
            schemas.mathverse,
            hub_id="AI4Math/MathVerse",
            config="testmini",
            splits=("testmini",),
            subset="testmini, 3,940 rows = 788 problems x 5 versions with an image (Text Only excluded); "
            "prompt = `query_cot`",
            differences="VLMEvalKit MathVerse_MINI 'Overall' averages the same 3,940 rows with GPT-4o-mini extraction "
            "and judging; ours reads the last \\boxed{} (unboxed = wrong)",
        ),
        Benchmark(
            "mmmu_pro_vision",
            "MMMU-Pro-vision",
            schemas.mmmu_pro_vision,
            hub_id="MMMU/MMMU_Pro",
            config="vision",
            local_subdir="vision",
            subset="vision config, test, 1,730 screenshots (question and options inside the image)",
            differences="VLMEvalKit MMMU_Pro_V asks for the letter directly; ours adds the training instruction "
            "(reasoning, then \\boxed{}) and accepts the letter or the option text",
        ),
        Benchmark(
            "logicvista",
            "LogicVista",
            schemas.logicvista,
            read_local=schemas.read_logicvista,
            subset="the official release (github.com/Yijia-Xiao/LogicVista, data/), 448 questions",
            differences=f"{_VLMEVAL}; a multi-answer question ('A, C') needs exactly those letters",
        ),
        Benchmark(
            "geometry3k",
            "Geometry3K",
            schemas.geometry3k,
            hub_id="hiyouga/geometry3k",
            subset="test, 601 questions, free-form answers",
            differences="not in the paper's Table 1: the authors' held-out set during training (Table 2 runs)",
        ),
    )
}
TABLE1_BENCHMARKS: tuple[str, ...] = (
    "mathvista",
    "dynamath",
    "wemath",
    "mathvision",
    "mathverse",
    "mmmu_pro_vision",
    "logicvista",
)
SYNTHETIC = "synthetic"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def benchmark_title(name: str) -> str:
    """The table header of a benchmark (a local file keeps its own name)."""
    return REGISTRY[name].title if name in REGISTRY else ("Synthetic" if name == SYNTHETIC else name)


def is_local_file(spec: str) -> bool:
    return spec.lower().endswith(LOCAL_SUFFIXES)


def check_benchmark_names(specs: Sequence[str]) -> None:
    """Fail before any model is loaded: every entry is a registry name, `synthetic` or a local data file."""
    if not specs:
        raise ValueError("no benchmark given: pass --benchmarks with at least one name or local file")
    unknown = [s for s in specs if s not in REGISTRY and s != SYNTHETIC and not is_local_file(s)]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {unknown}; valid names: {sorted(REGISTRY) + [SYNTHETIC]}, "
            f"or a local file ending in {', '.join(LOCAL_SUFFIXES)}"
        )
    names = [local_name(s) if is_local_file(s) else s for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"benchmark(s) {duplicates} given twice")


def local_name(path: str) -> str:
    """A local file is reported under its file name without suffix."""
    return Path(path).name.rsplit(".", 1)[0]


# --- loading ------------------------------------------------------------------------------------------------------


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image columns as raw `{"bytes", "path"}` dicts: `convert_rows` decodes each once to check it, and keeps bytes."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List | datasets.Sequence) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


def _source_records(benchmark: Benchmark, path: Path | None) -> Iterable[tuple[str, int, Mapping[str, Any]]]:
    """(split, index, record) of every split, from the Hub or from a local copy laid out like the Hub repository."""
    for split in benchmark.splits:
        if path is None:
            rows: Iterable[Mapping[str, Any]] = _undecoded(
                datasets.load_dataset(benchmark.hub_id, benchmark.config, split=split)
            )
        elif path.is_file():
            rows = loaders.read_records(path)
        else:
            folder = (
                path / benchmark.local_subdir
                if benchmark.local_subdir and (path / benchmark.local_subdir).is_dir()
                else path
            )
            rows = [record for file in _split_files(benchmark, folder, split) for record in loaders.read_records(file)]
        for index, record in enumerate(rows):
            yield split, index, record


def _split_files(benchmark: Benchmark, folder: Path, split: str) -> list[Path]:
    errors = []
    for prefix in benchmark.split_files.get(split, (split,)):
        try:
            return loaders.parquet_split_files(folder, prefix)
        except FileNotFoundError as error:
            errors.append(str(error))
    raise FileNotFoundError(f"{benchmark.name}: " + "; ".join(errors))


def _adapted(benchmark: Benchmark, path: Path | None, max_samples: int | None) -> tuple[list[Record], Path | None]:
    if benchmark.read_local is not None:
        if path is None:
            raise ValueError(
                f"benchmark {benchmark.name!r} has no Hub copy with a verified schema: download it "
                f"({benchmark.subset}) and pass --benchmark_paths {benchmark.name}=<folder>"
            )
        records, image_root = benchmark.read_local(path)
        rows = [benchmark.adapt(record, "test", index) for index, record in enumerate(records)]
    else:
        image_root = (path if path.is_dir() else path.parent) if path is not None else None
        rows = []
        for split, index, record in _source_records(benchmark, path):
            rows.append(benchmark.adapt(record, split, index))
            if max_samples is not None and len(rows) >= max_samples:
                break
    return rows[:max_samples] if max_samples is not None else rows, image_root


def to_dataset(
    name: str,
    rows: Sequence[Record],
    *,
    prompt_suffix: str | None,
    image_root: str | os.PathLike | None = None,
    source: str = "",
) -> datasets.Dataset:
    """Canonical records -> the evaluation row format; raises a ValueError naming the benchmark and the row."""
    if not rows:
        raise ValueError(f"benchmark {name!r}: {source or 'the source'} has no rows (empty split?)")
    ids = [str(row["id"]) for row in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5] if len(set(ids)) < len(ids) else []
    if duplicates:
        raise ValueError(f"benchmark {name!r}: duplicate ids {duplicates} (resumption and seeding key on the id)")
    try:
        return loaders.convert_rows(
            [{**row, "id": str(row["id"])} for row in rows],
            question_column="question",
            answer_column="answer",
            image_column="images",
            image_root=image_root,
            id_column="id",
            keep_columns=("id", "options"),
            prompt_suffix=prompt_suffix,
        )
    except ValueError as error:
        raise ValueError(f"benchmark {name!r} ({source}): {error}") from error


def load_benchmark(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    prompt_suffix: str | None = loaders.DEFAULT_PROMPT_SUFFIX,
    max_samples: int | None = None,
) -> datasets.Dataset:
    """One registry benchmark, from the Hub or from `path` (a local copy of its files, or one data file)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {sorted(REGISTRY)}")
    benchmark = REGISTRY[name]
    local = Path(path).expanduser() if path is not None else None
    if local is not None and not local.exists():
        raise FileNotFoundError(f"benchmark {name!r}: local path {local} does not exist")
    rows, image_root = _adapted(benchmark, local, max_samples)
    source = str(local) if local is not None else f"{benchmark.hub_id} {'/'.join(benchmark.splits)}"
    logger.info("%s: %d rows from %s", name, len(rows), source)
    return to_dataset(name, rows, prompt_suffix=prompt_suffix, image_root=image_root, source=source)


def load_local_benchmark(
    path: str | os.PathLike,
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    image_column: str = "image",
    image_root: str | os.PathLike | None = None,
    id_column: str | None = None,
    options_column: str | None = None,
    prompt_suffix: str | None = loaders.DEFAULT_PROMPT_SUFFIX,
    max_samples: int | None = None,
) -> datasets.Dataset:
    """A local JSONL / JSON / parquet file with image paths, read with the training loader's column options
    (`cppo_trl.data.load_local`); `options_column` (a list, or `A. x; B. y` text) makes rows multiple-choice."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"local benchmark file {path} does not exist")
    records = loaders.read_records(path)[:max_samples]
    wanted = [question_column, answer_column, image_column] + [c for c in (id_column, options_column) if c]
    missing = [column for column in wanted if records and column not in records[0]]
    if missing:
        raise ValueError(f"local benchmark {path}: columns {missing} not found; available: {sorted(records[0])}")
    rows = [
        {
            "id": record[id_column] if id_column else index,
            "question": record[question_column],
            "answer": record[answer_column],
            "images": record[image_column],
            "options": schemas.options_value(record[options_column]) if options_column else None,
        }
        for index, record in enumerate(records)
    ]
    root = image_root if image_root is not None else path.parent
    return to_dataset(local_name(str(path)), rows, prompt_suffix=prompt_suffix, image_root=root, source=str(path))


def from_dataset(name: str, dataset: datasets.Dataset) -> datasets.Dataset:
    """A dataset already in prompt/images/solution form (a training split): ids by position unless it has `id`,
    free-form unless it has `options`."""
    missing = [column for column in ("prompt", "images", "solution") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} lacks columns {missing}; has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {name!r} has no rows")
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", [str(i) for i in range(len(dataset))])
    if "options" not in dataset.column_names:
        dataset = dataset.add_column("options", [None] * len(dataset))
    return dataset
