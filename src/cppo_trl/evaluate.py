"""`cppo-eval`: the paper's evaluation protocol on any checkpoint, the perturbation audit, and run comparison.

    cppo-eval --config recipes/eval/eval_table1.yaml --model_name_or_path data/Qwen2.5-VL-3B-Instruct-CPPO-ViRL39K
    cppo-eval --config recipes/eval/eval_table6.yaml --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct
    cppo-eval compare outputs/eval/grpo outputs/eval/cppo --output_dir outputs/eval/compare

Protocol (paper §5): accuracy@k = the mean over k sampled completions of the per-sample score (k = 8, temperature 1,
top-p 1, top-k off), prompted like training (question, then the recipe's instruction ending in `\\boxed{}`), scored by
the trainer's `accuracy` reward. Per benchmark: mean and std over the k draws; then the average over benchmarks.

Outputs in `--output_dir` (one pass, `cppo_trl.runner`): `predictions.jsonl` (appended after every batch; a re-run
skips finished samples and ends with the same `results.json` as an uninterrupted run), `run_config.json`, and, only
once every sample is scored, `results.json` and `results.md`. `--perturb` adds one `perturb-<view>/` pass per view
and `perturbation_audit.md`. Under `accelerate launch` the samples are sharded over processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from cppo_trl import benchmarks as registry
from cppo_trl import generation, report
from cppo_trl.generation import BACKENDS, SamplingConfig
from cppo_trl.runner import RESULTS_MD, Runtime, Settings, build_runtime, read_predictions, run_one


logger = logging.getLogger(__name__)

AUDIT_JSON, AUDIT_MD = "perturbation_audit.json", "perturbation_audit.md"
VIEW_SETS = ("preserving", "removing")


@dataclass
class EvalArguments:
    """Everything `cppo-eval` reads from its YAML recipe (`--config`) and the command line (which wins)."""

    # Model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder, Hub model id, or LoRA adapter folder (base read from adapter_config)."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is visible."})
    # Data
    benchmarks: list[str] = field(
        default_factory=lambda: list(registry.TABLE1_BENCHMARKS),
        metadata={
            "help": f"Registry names ({', '.join([*registry.REGISTRY, registry.SYNTHETIC])}) and/or local "
            "JSONL/parquet files. Default: the paper's Table 1 seven."
        },
    )
    benchmark_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Local copies as name=path (a folder laid out like the Hub repository, or one data file)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Only the first N rows of each benchmark (smoke runs; not the protocol)."}
    )
    training_recipe: str | None = field(
        default=None,
        metadata={
            "help": "Training recipe YAML whose prompt_suffix, min/max_pixels, perturbation fields and synthetic "
            "task settings the evaluation reuses (default: the training defaults)."
        },
    )
    prompt_suffix: str | None = field(
        default=None, metadata={"help": "Instruction after each question (default: the recipe's, else training's)."}
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Processor min_pixels (default: the recipe's)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Processor max_pixels (default: the recipe's)."})
    question_column: str = field(default="question", metadata={"help": "Local files: question column."})
    answer_column: str = field(default="answer", metadata={"help": "Local files: answer column."})
    image_column: str = field(default="image", metadata={"help": "Local files: image path(s) column."})
    image_root: str | None = field(default=None, metadata={"help": "Local files: folder of relative image paths."})
    id_column: str | None = field(default=None, metadata={"help": "Local files: id column (default: row number)."})
    options_column: str | None = field(
        default=None, metadata={"help": "Local files: option texts column; its rows become multiple-choice."}
    )
    # Protocol
    num_samples: int = field(default=8, metadata={"help": "k completions per question (paper: 8)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0; 0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (paper: 1.0, off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling, 0 = off (paper: off)."})
    max_new_tokens: int = field(
        default=2048, metadata={"help": "Completion budget (the authors' VLMEvalKit default: 2048)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each sample's draws are seeded by (seed, sample id)."})
    # Backend
    backend: str = field(default="transformers", metadata={"help": "Generation backend.", "choices": list(BACKENDS)})
    batch_size: int = field(
        default=8,
        metadata={"help": "Prompts per generation call (vLLM: per request batch) and per predictions flush."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model (one node)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: context length (default: model's)."})
    # Perturbation audit
    perturb: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Also evaluate with every image replaced by a view: 'preserving' / 'removing' (each transform of "
            "the recipe's set, one row each) or transform names; 'none' turns a recipe's list off. Writes "
            "perturbation_audit.md."
        },
    )
    # Outputs
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and results go."})
    run_name: str | None = field(default=None, metadata={"help": "Row label in tables (default: the model name)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete predictions made with other settings instead of refusing."}
    )
    model_card: bool = field(
        default=False, metadata={"help": "Append the results table to the local model folder's README.md."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Append the results table to the Hub model card."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository for --push_to_hub (default: the evaluated Hub id)."}
    )

    def __post_init__(self) -> None:
        _ = self.sampling  # validates the protocol fields, naming the bad one
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            self.num_samples, self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.seed
        )


def resolve_settings(args: EvalArguments) -> Settings:
    """Prompt suffix, pixel budget and view parameters of the training run, so evaluation matches it."""
    from cppo_trl.cppo import CPPOScriptArguments, make_parser
    from cppo_trl.data import DEFAULT_PROMPT_SUFFIX
    from cppo_trl.perturbations import PerturbationParams

    if args.training_recipe:
        recipe = Path(args.training_recipe)
        if not recipe.is_file():
            raise FileNotFoundError(f"training_recipe {recipe} does not exist")
        # Relies on transformers 5: building the TrainingArguments (GRPOConfig reads the world size) initialises
        # accelerate's PartialState singleton with `use_cpu`; parsing with the evaluation's own `use_cpu` makes that
        # state the one the evaluation then runs on (a recipe's `use_cpu: true` must not move a GPU evaluation).
        # Mixed precision is a training setting; switched off so that a GPU recipe also parses on a CPU machine.
        with tempfile.TemporaryDirectory() as scratch:
            script_args, training_args, _ = make_parser().parse_args_and_config(
                args=[
                    *("--config", str(recipe), "--output_dir", scratch, "--report_to", "none"),
                    *("--use_cpu", str(args.use_cpu).lower(), "--bf16", "false", "--fp16", "false"),
                ]
            )
        params, data_seed = training_args.perturbation_params, training_args.seed
    else:
        script_args, params, data_seed = CPPOScriptArguments(), PerturbationParams(), 42
    suffix = args.prompt_suffix if args.prompt_suffix is not None else script_args.prompt_suffix
    return Settings(
        prompt_suffix=DEFAULT_PROMPT_SUFFIX if suffix is None else suffix,
        min_pixels=args.min_pixels or script_args.min_pixels,
        max_pixels=args.max_pixels or script_args.max_pixels,
        perturbation_params=params,
        script_args=script_args,
        data_seed=data_seed,
    )


def _pairs(entries: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"benchmark_paths entries are name=path, got {entry!r}")
        pairs[name.strip()] = path.strip()
    return pairs


def expand_views(names: Sequence[str], params) -> dict[str, str]:
    """`--perturb` entries -> {view name: 'preserving' | 'removing'} in order (sets expand to the recipe's list)."""
    from cppo_trl.perturbations import PRESERVING_PERTURBATIONS, REMOVING_PERTURBATIONS

    if list(names) == ["none"]:  # `--perturb none` switches a recipe's audit off
        return {}
    views: dict[str, str] = {}
    for name in names:
        if name == "preserving":
            views.update(dict.fromkeys(params.preserving_perturbations, "preserving"))
        elif name == "removing":
            views.update(dict.fromkeys(params.removing_perturbations, "removing"))
        elif name in PRESERVING_PERTURBATIONS:
            views[name] = "preserving"
        elif name in REMOVING_PERTURBATIONS:
            views[name] = "removing"
        else:
            valid = [*VIEW_SETS, *PRESERVING_PERTURBATIONS, *REMOVING_PERTURBATIONS, "none"]
            raise ValueError(f"unknown --perturb value {name!r}; valid: {', '.join(valid)}")
    return views


def load_benchmarks(
    args: EvalArguments, settings: Settings, given: Mapping[str, datasets.Dataset] | None = None
) -> dict[str, datasets.Dataset]:
    """Every benchmark loaded and validated before a model is touched (a bad one fails here, with its name)."""
    if given:
        return {name: registry.from_dataset(name, dataset) for name, dataset in given.items()}
    registry.check_benchmark_names(args.benchmarks)
    paths = _pairs(args.benchmark_paths)
    unknown = sorted(set(paths) - set(registry.REGISTRY))
    if unknown:
        raise ValueError(f"benchmark_paths names {unknown} are not registry benchmarks ({sorted(registry.REGISTRY)})")
    loaded = {}
    for spec in args.benchmarks:
        if registry.is_local_file(spec):
            loaded[registry.local_name(spec)] = registry.load_local_benchmark(
                spec,
                question_column=args.question_column,
                answer_column=args.answer_column,
                image_column=args.image_column,
                image_root=args.image_root,
                id_column=args.id_column,
                options_column=args.options_column,
                prompt_suffix=settings.prompt_suffix,
                max_samples=args.max_samples,
            )
        elif spec == registry.SYNTHETIC:
            from cppo_trl.cppo import load_split

            script_args = dataclasses.replace(
                settings.script_args, dataset_name="synthetic", prompt_suffix=settings.prompt_suffix
            )
            split = load_split(script_args, script_args.dataset_test_split, settings.data_seed)
            if args.max_samples is not None:
                split = split.select(range(min(args.max_samples, len(split))))
            loaded[spec] = registry.from_dataset(spec, split)
        else:
            loaded[spec] = registry.load_benchmark(
                spec, path=paths.get(spec), prompt_suffix=settings.prompt_suffix, max_samples=args.max_samples
            )
    return loaded


# --- the whole evaluation -----------------------------------------------------------------------------------------


def _check_card_targets(args: EvalArguments) -> None:
    if args.model_card and not Path(args.model_name_or_path).expanduser().is_dir():
        raise ValueError("--model_card appends to a local model folder's README.md; for a Hub model use --push_to_hub")
    if args.push_to_hub and not args.hub_model_id and Path(args.model_name_or_path).expanduser().exists():
        raise ValueError("--push_to_hub with a local model needs --hub_model_id (the repository whose card to update)")


def run_evaluation(
    args: EvalArguments,
    given: Mapping[str, datasets.Dataset] | None = None,
    runtime: Runtime | None = None,
    with_predictions: bool = False,
) -> dict[str, Any]:
    """The original run, then (with --perturb) one run per view and the audit; returns the original run's results
    (with an `audit` key when views were evaluated, and `predictions` in benchmark order when asked)."""
    if runtime is None:
        generation.resolve_model(args.model_name_or_path)  # a missing checkpoint fails before any data is loaded
    settings = resolve_settings(args)
    views = expand_views(args.perturb, settings.perturbation_params)
    _check_card_targets(args)
    loaded = load_benchmarks(args, settings, given)
    runtime = runtime or build_runtime(args, settings, loaded)
    out = Path(args.output_dir)
    results = run_one(args, settings, loaded, runtime, out)
    view_results = {view: run_one(args, settings, loaded, runtime, out / f"perturb-{view}", view) for view in views}
    if not runtime.is_main:
        return {}
    markdown = report.results_markdown(results)
    if views:
        audit = report.perturbation_audit(results, view_results, views)
        audit_md = report.audit_markdown(results, view_results, audit)
        (out / AUDIT_JSON).write_text(json.dumps(audit, indent=2) + "\n", encoding="utf-8")
        (out / AUDIT_MD).write_text(audit_md, encoding="utf-8")
        results = {**results, "audit": audit}
        markdown += "\n" + audit_md
    if args.model_card:
        logger.info("results appended to %s", report.update_local_card(args.model_name_or_path, markdown))
    if args.push_to_hub:
        report.push_card(args.hub_model_id or args.model_name_or_path, markdown)
    if with_predictions:
        records = read_predictions(out)
        results["predictions"] = [records[(name, i)] for name, ds in loaded.items() for i in ds["id"]]
    return results


def evaluate_model(
    model_name_or_path: str | os.PathLike,
    benchmarks: str | Sequence[str] | datasets.Dataset | Mapping[str, datasets.Dataset] = registry.SYNTHETIC,
    *,
    output_dir: str | os.PathLike | None = None,
    name: str = "dataset",
    **options: Any,
) -> dict[str, Any]:
    """Python entry point: the `results.json` content, plus `predictions` (one record per sample) in memory.

    `benchmarks`: registry name(s) / local file(s), or datasets already in prompt/images/solution form (a dict gives
    their names; a lone dataset is called `name`). `options` are `EvalArguments` fields (`num_samples=8`,
    `temperature=1.0`, `max_new_tokens`, `batch_size`, `perturb`, `training_recipe`, ...). Without `output_dir` the
    run goes to a temporary folder (no resumption).
    """
    given = None
    if isinstance(benchmarks, datasets.Dataset):
        given = {name: benchmarks}
    elif isinstance(benchmarks, Mapping):
        given = dict(benchmarks)
    names = list(given) if given else ([benchmarks] if isinstance(benchmarks, str) else list(benchmarks))
    with tempfile.TemporaryDirectory(prefix="cppo-eval-") as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        args = EvalArguments(
            model_name_or_path=str(model_name_or_path), benchmarks=names, output_dir=str(folder), **options
        )
        return run_evaluation(args, given, with_predictions=True)


# --- command line -------------------------------------------------------------------------------------------------


def make_parser():
    """The parser every eval recipe goes through (`tests/test_evaluate_cli.py` parses each one with it)."""
    from trl import TrlParser

    parser = TrlParser((EvalArguments,))
    parser.prog = "cppo-eval"
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = (
        "cppo-eval compare RUN_A RUN_B ...: table and bar chart of finished runs (see cppo-eval compare --help)."
    )
    return parser


def compare_main(argv: Sequence[str]) -> str:
    """`cppo-eval compare RUN [RUN ...]`: table, bar chart and JSON of finished runs, with the paper's rows."""
    import argparse

    parser = argparse.ArgumentParser(prog="cppo-eval compare", description=compare_main.__doc__)
    parser.add_argument("runs", nargs="+", help="Run folders (or their results.json) of finished cppo-eval runs.")
    parser.add_argument("--output_dir", default="outputs/eval/compare", help="Where compare.md/.json/.png go.")
    parser.add_argument(
        "--paper",
        nargs="*",
        default=["3B", "7B"],
        choices=["3B", "7B", "none"],
        help="Which of the paper's Table 1 model sizes to show as reference rows ('none' for no row).",
    )
    parsed = parser.parse_args(list(argv))
    sizes = [] if "none" in parsed.paper else parsed.paper
    table = report.compare_runs(parsed.runs, parsed.output_dir, sizes)
    print(table)
    print(f"written: {Path(parsed.output_dir) / 'compare.md'}, compare.json, compare.png")
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """Console entry point (`cppo-eval`, `python -m cppo_trl.evaluate`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", stream=sys.stdout
    )
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    (args,) = make_parser().parse_args_and_config(args=argv)
    results = run_evaluation(args)
    out = Path(args.output_dir)
    if results and (out / RESULTS_MD).exists():  # the main process prints (the others return no results)
        print((out / RESULTS_MD).read_text(encoding="utf-8"))
    if results and (out / AUDIT_MD).exists():
        print((out / AUDIT_MD).read_text(encoding="utf-8"))
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script: runs `main` and exits 0 (a console wrapper would `sys.exit` `main`'s results dict,
    which prints it and exits 1)."""
    main(argv)


if __name__ == "__main__":
    cli()
