"""One evaluation pass of `cppo-eval` into a folder: resumable, shardable over processes, complete or silent.

- `predictions.jsonl` gets one line per sample (its k completions, extracted answers and scores) after every batch;
  a re-run reads it back and skips finished samples. Every sample's draws are seeded by (seed, sample id), so the
  finished file is the same whether the run was interrupted, resumed, or sharded over processes.
- `run_config.json` records the settings the predictions were made with; a re-run with other settings is refused
  (or, with `overwrite_output_dir`, starts over) instead of mixing draws.
- `results.json` / `results.md` are deleted when a pass starts and written only once every sample is scored, so a
  results file never claims more than the predictions hold.
Under `accelerate launch`, process r generates the samples r, r + world, ... into `predictions.rank{r}.jsonl`; the
main process folds them into `predictions.jsonl` and scores the whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from tqdm.auto import tqdm

from cppo_trl.core.images import load_processor
from cppo_trl.evaluate import benchmarks as registry
from cppo_trl.evaluate import report
from cppo_trl.evaluate.generation import Prompt


if TYPE_CHECKING:
    from cppo_trl.evaluate.arguments import EvalArguments

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_CONFIG = "run_config.json"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


@dataclass
class Settings:
    """What the evaluation takes from the training recipe (or the training defaults)."""

    prompt_suffix: str | None
    min_pixels: int | None
    max_pixels: int | None
    perturbation_params: Any
    script_args: Any  # CPPOScriptArguments, for the synthetic task
    data_seed: int
    align_occlusion: bool = True  # occlusion cells on the vision-token grid, as the trainer draws them by default


def _scan(file: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(line, record) of every complete line, streamed. A last line cut short by a crash (not JSON, or no newline yet)
    is cut off the file, so that the next append starts clean; it will be generated again."""
    end = 0
    with file.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            if record is None:
                if handle.read().strip():
                    raise ValueError(f"{file}: the line at byte {end} is not JSON")
                logger.warning("%s: dropping a truncated last line (an interrupted write)", file)
                break
            end += len(line)
            yield line, record
    if end != file.stat().st_size:
        with file.open("r+b") as handle:
            handle.truncate(end)


def read_predictions(folder: Path, fields: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished samples of a run, by (benchmark, id), from `predictions.jsonl`. `fields` keeps only those keys of
    each record: a Table 1 run holds ~100k completions, which resumption and scoring do not need in memory."""
    file = folder / PREDICTIONS
    if not file.exists():
        return {}
    return {
        (record["benchmark"], record["id"]): record if fields is None else {name: record[name] for name in fields}
        for _, record in _scan(file)
    }


def gather_parts(folder: Path) -> None:
    """Fold the per-process files of a parallel pass (finished, or left by an interrupted one) into predictions.jsonl."""
    parts = sorted(folder.glob("predictions.rank*.jsonl"))
    if not parts:
        return
    main = folder / PREDICTIONS
    if main.exists():
        for _ in _scan(main):  # cut a truncated tail before appending
            pass
    with main.open("ab") as merged:
        for part in parts:
            merged.writelines(line for line, _ in _scan(part))
    for part in parts:
        part.unlink()


def _run_config(args: EvalArguments, settings: Settings, view: str | None, runtime: Runtime) -> dict:
    return {
        "model": runtime.model_id,
        "model_fingerprint": runtime.fingerprint,
        "dtype": runtime.dtype,
        "backend": args.backend,
        **dataclasses.asdict(args.sampling),
        "prompt_suffix": settings.prompt_suffix,
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
        "perturbation": view,
        "perturbation_params": dataclasses.asdict(settings.perturbation_params) if view else None,
    }


def _prepare_folder(folder: Path, config: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix predictions made with other settings (every process checks, so all stop together); the main
    process removes the results that the run will rewrite only once every sample is scored."""
    config_file = folder / RUN_CONFIG
    previous = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else config
    changed = sorted(
        k for k in config.keys() | previous.keys() if json.dumps(config.get(k)) != json.dumps(previous.get(k))
    )
    if changed and not overwrite:
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(
            f"{folder} holds predictions made with other settings ({details}); use another --output_dir or "
            "--overwrite_output_dir true"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if not is_main:
        return
    if changed:
        for stale in folder.glob("predictions*.jsonl"):
            stale.unlink()
    for stale in (RESULTS_JSON, RESULTS_MD):
        (folder / stale).unlink(missing_ok=True)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --- one run ------------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """The loaded model side of an evaluation, shared by the original run and every perturbation view."""

    backend: Any
    budget: Any  # PixelBudget or None
    model_id: str
    dtype: str
    fingerprint: str | None = None
    rank: int = 0
    world_size: int = 1
    barrier: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.barrier is not None and self.world_size > 1:
            self.barrier()


def _prompt(row: Mapping[str, Any], benchmark: str, runtime: Runtime, view: str | None, settings: Settings, seed: int):
    from cppo_trl.core.images import to_rgb
    from cppo_trl.core.perturbations import apply_perturbation, view_seed

    key = f"{benchmark}/{row['id']}"
    images = [to_rgb(image) for image in row["images"]]
    if view is not None:
        aligned = settings.align_occlusion and runtime.budget is not None
        images = [
            apply_perturbation(
                image,
                view,
                settings.perturbation_params,
                torch.Generator().manual_seed(view_seed(seed, 0, f"{key}/{index}")),
                runtime.budget.token_grid(*image.size) if aligned else None,
            )
            for index, image in enumerate(images)
        ]
    return Prompt(key=key, messages=row["prompt"], images=images)


def _score(row: Mapping[str, Any], benchmark: str, completions: list[str]) -> dict[str, Any]:
    from cppo_trl.data.rewards import accuracy_reward, extract_boxed

    k = len(completions)
    scores = accuracy_reward(completions, solution=[row["solution"]] * k, options=[row["options"]] * k)
    return {
        "benchmark": benchmark,
        "id": row["id"],
        "completions": completions,
        "answers": [extract_boxed(c) for c in completions],
        "scores": scores,
        "solution": row["solution"],
    }


def run_one(
    args: EvalArguments,
    settings: Settings,
    loaded: Mapping[str, datasets.Dataset],
    runtime: Runtime,
    folder: Path,
    view: str | None = None,
) -> dict[str, Any]:
    """Evaluate every benchmark into `folder` (resuming), then write results.json / results.md when complete.

    Returns the results on the main process, None on the others (their predictions are gathered by the main one).
    """
    config = _run_config(args, settings, view, runtime)
    _prepare_folder(folder, config, args.overwrite_output_dir, runtime.is_main)
    if runtime.is_main:
        gather_parts(folder)
    runtime.wait()  # every process reads the same finished set before anyone writes
    done = read_predictions(folder, fields=())
    mine = folder / (PREDICTIONS if runtime.world_size == 1 else f"predictions.rank{runtime.rank}.jsonl")
    backend, chunk = runtime.backend, runtime.backend.chunk_size
    with mine.open("a", encoding="utf-8") as sink:
        for name, dataset in loaded.items():
            pending = [i for i, sample_id in enumerate(dataset["id"]) if (name, sample_id) not in done]
            shard = pending[runtime.rank :: runtime.world_size]
            label = registry.benchmark_title(name) + (f" [{view}]" if view else "")
            total = len(dataset) if runtime.world_size == 1 else len(shard)
            bar = tqdm(total=total, initial=total - len(shard), desc=label, unit="sample", disable=not runtime.is_main)
            for start in range(0, len(shard), chunk):
                rows = [dataset[i] for i in shard[start : start + chunk]]
                prompts = [_prompt(row, name, runtime, view, settings, args.seed) for row in rows]
                for row, completions in zip(rows, backend.generate(prompts), strict=True):
                    sink.write(json.dumps(_score(row, name, completions), ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(len(rows))
            bar.close()
    runtime.wait()
    results = None
    if runtime.is_main:
        gather_parts(folder)
        results = _results(args, loaded, folder, config)
    runtime.wait()
    return results


def _results(args: EvalArguments, loaded: Mapping[str, datasets.Dataset], folder: Path, config: dict) -> dict:
    records = read_predictions(folder, fields=("scores",))
    missing = {name: sum((name, i) not in records for i in ds["id"]) for name, ds in loaded.items()}
    if any(missing.values()):
        raise RuntimeError(f"{folder}: samples without predictions {missing}; results.json not written")
    per_benchmark = {
        name: report.benchmark_summary(
            registry.benchmark_title(name), [records[(name, i)]["scores"] for i in ds["id"]]
        )
        for name, ds in loaded.items()
    }
    results = {
        "complete": True,
        "model": config["model"],
        "run_name": args.run_name or Path(str(args.model_name_or_path).rstrip("/")).name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": config,
        "benchmarks": per_benchmark,
        **report.overall_summary(per_benchmark),
        "predictions_file": PREDICTIONS,
    }
    (folder / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (folder / RESULTS_MD).write_text(report.results_markdown(results), encoding="utf-8")
    return results


def build_runtime(args: EvalArguments, settings: Settings, loaded: Mapping[str, datasets.Dataset]) -> Runtime:
    """Model, processor and backend; data-parallel rank/world from accelerate when launched with it."""
    from accelerate import PartialState

    from cppo_trl.core.images import PixelBudget
    from cppo_trl.evaluate import generation

    base, adapter = generation.resolve_model(args.model_name_or_path)
    local = adapter or (base if Path(base).exists() else None)
    model_id = str(Path(local).resolve()) if local else base  # a Hub id stays as it is
    state = PartialState(cpu=args.use_cpu)
    device = state.device
    if args.use_cpu and device.type != "cpu":
        raise RuntimeError(f"--use_cpu: this process already set accelerate up on {device}; run in a fresh process")
    dtype_name = ("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    processor = load_processor(
        generation.processor_source(base, adapter),
        settings.min_pixels,
        settings.max_pixels,
        trust_remote_code=args.trust_remote_code,
    )
    if args.backend == "vllm":
        if state.num_processes > 1:
            raise ValueError(
                "--backend vllm parallelises itself (tensor_parallel_size): run it without accelerate launch"
            )
        generation.import_vllm()
        model_path = (
            generation.merged_checkpoint(base, adapter, Path(args.output_dir) / ".merged-model") if adapter else base
        )
        backend = generation.VLLMBackend(
            model_path,
            processor,
            args.sampling,
            chunk_size=args.batch_size,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_images_per_prompt=max(max((len(x) for x in ds["images"]), default=1) for ds in loaded.values()),
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            dtype=dtype_name,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        model = generation.load_model(
            base, adapter, getattr(torch, dtype_name), device, trust_remote_code=args.trust_remote_code
        )
        backend = generation.TransformersBackend(model, processor, args.sampling, args.batch_size)
    return Runtime(
        backend=backend,
        budget=PixelBudget.from_processor(processor),
        model_id=model_id,
        dtype=dtype_name,
        fingerprint=generation.model_fingerprint(adapter or base),
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
    )
