"""The paper's evaluation protocol on one model: the original run, the perturbation audit, model-card sections, and
`evaluate_model` for Python callers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from cppo_trl.evaluate import benchmarks as registry
from cppo_trl.evaluate import generation, report
from cppo_trl.evaluate.arguments import EvalArguments
from cppo_trl.evaluate.runner import Runtime, Settings, build_runtime, read_predictions, run_one


logger = logging.getLogger(__name__)

AUDIT_JSON, AUDIT_MD = "perturbation_audit.json", "perturbation_audit.md"
VIEW_SETS = ("preserving", "removing")


def resolve_settings(args: EvalArguments) -> Settings:
    """Prompt suffix, pixel budget and view parameters of the training run, so evaluation matches it."""
    from cppo_trl.core.perturbations import PerturbationParams
    from cppo_trl.data.loaders import DEFAULT_PROMPT_SUFFIX
    from cppo_trl.data.script_args import CPPOScriptArguments
    from cppo_trl.recipe import make_parser

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
        align_occlusion = getattr(training_args, "occlusion_patch_size", None) is None
    else:
        script_args, params, data_seed, align_occlusion = CPPOScriptArguments(), PerturbationParams(), 42, True
    suffix = args.prompt_suffix if args.prompt_suffix is not None else script_args.prompt_suffix
    return Settings(
        prompt_suffix=DEFAULT_PROMPT_SUFFIX if suffix is None else suffix,
        min_pixels=args.min_pixels or script_args.min_pixels,
        max_pixels=args.max_pixels or script_args.max_pixels,
        perturbation_params=params,
        script_args=script_args,
        data_seed=data_seed,
        align_occlusion=align_occlusion,
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
    from cppo_trl.core.perturbations import PRESERVING_PERTURBATIONS, REMOVING_PERTURBATIONS

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
            from cppo_trl.data.splits import load_split

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
