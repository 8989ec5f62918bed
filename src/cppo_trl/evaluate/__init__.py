"""`cppo-eval`: the paper's evaluation protocol on any checkpoint, the perturbation audit, and run comparison.

    cppo-eval --config recipes/eval/eval_table1.yaml --model_name_or_path data/Qwen2.5-VL-3B-Instruct-CPPO-ViRL39K
    cppo-eval --config recipes/eval/eval_table6.yaml --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct
    cppo-eval compare outputs/eval/grpo outputs/eval/cppo --output_dir outputs/eval/compare

Protocol (paper §5): accuracy@k = the mean over k sampled completions of the per-sample score (k = 8, temperature 1,
top-p 1, top-k off), prompted like training (question, then the recipe's instruction ending in `\boxed{}`), scored by
the trainer's `accuracy` reward. Per benchmark: mean and std over the k draws; then the average over benchmarks.

Outputs in `--output_dir` (one pass, `cppo_trl.evaluate.runner`): `predictions.jsonl` (appended after every batch; a re-run
skips finished samples and ends with the same `results.json` as an uninterrupted run), `run_config.json`, and, only
once every sample is scored, `results.json` and `results.md`. `--perturb` adds one `perturb-<view>/` pass per view
and `perturbation_audit.md`. Under `accelerate launch` the samples are sharded over processes.
"""

from importlib import import_module
from typing import TYPE_CHECKING


# Imported on first use (PEP 562), so `cppo_trl.evaluate.report` or `.schemas` alone do not load the evaluator.
_EXPORTS = {"EvalArguments": ".arguments", "evaluate_model": ".evaluation", "run_evaluation": ".evaluation"}

if TYPE_CHECKING:
    from .arguments import EvalArguments
    from .evaluation import evaluate_model, run_evaluation


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalArguments", "evaluate_model", "run_evaluation"]
