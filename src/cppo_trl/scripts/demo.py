"""Offline CPU demo: SFT warm-up, then CPPO through the real training script, then what it changed.

`python -m cppo_trl.scripts.demo --out outputs/demo` (`make demo`) runs on a laptop without GPU or network in a few minutes:

1. builds the tiny random Qwen2.5-VL of `cppo_trl.testing` (cached) and the synthetic perception task of
   `cppo_trl.data.synthetic`, whose answers (colour, count, position, digit) can only be read off the image;
2. warms the policy up with TRL's `SFTTrainer` on question -> `\\boxed{answer}`. Why: a random policy never emits a
   parsable answer, so every rollout of a group scores 0, advantages vanish and the advantage-gated CPL never fires.
   After the warm-up the policy answers in the right format with a guess among a handful of words, so groups mix
   right and wrong rollouts from the first RL step;
3. trains CPPO with `cppo_trl.scripts.train.main` on `recipes/tiny/cppo/config_demo_cpu.yaml` (the same script and recipe
   format as the paper runs; only `model_name_or_path` and `output_dir` are overridden here);
4. evaluates held-out accuracy@8 (temperature 1.0, the paper's protocol) before and after, and writes curves, a perception-token page, a perturbation
   sheet and `summary.json` into `--out`.

`benchmarks/compare.py` reuses `sft_warmup` and `run_recipe` for the GRPO vs PAPO vs CPPO comparison; both evaluate
with `cppo_trl.evaluate.evaluate_model` (the `cppo-eval` code path).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
DEMO_RECIPE = ROOT / "recipes" / "tiny" / "cppo" / "config_demo_cpu.yaml"
CURVE_METRICS = ("reward", "cppo/cpl_loss", "cppo/selected_token_fraction", "cppo/gated_fraction")
SUMMARY_KEYS = (
    "reward_first",
    "reward_last",
    "accuracy_before",
    "accuracy_after",
    "cpl_loss_mean",
    "gated_fraction_mean",
    "selected_token_fraction_mean",
)
# Steps averaged for "first" and "last" reward: single steps of 2-4 prompts are too noisy to compare.
REWARD_WINDOW = 5


# ------------------------------------------------------------------------------------------------------ recipe
def parse_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """Parse a recipe with the training script's own parser for its method (a fresh one: TrlParser writes YAML values
    into its defaults), CLI-style overrides winning, exactly as `cppo-train --config recipe.yaml --flag value` would."""
    from cppo_trl.recipe import parse_args

    return parse_args(["--config", str(recipe), *overrides])


def held_out_split(script_args, seed: int) -> datasets.Dataset:
    """The test split `cppo.main` would build for this recipe (same seed, sizes and prompt): never trained on."""
    from cppo_trl.data.splits import load_split

    return load_split(script_args, script_args.dataset_test_split, seed)


# ------------------------------------------------------------------------------------------------------ SFT
def sft_dataset(num_samples: int, seed: int, prompt_suffix: str | None, tasks: Sequence[str]) -> datasets.Dataset:
    """Synthetic rows in TRL's prompt-completion vision format with the completion `\\boxed{<answer>}`; drawn from a
    seed stream other than the RL/held-out one, so warm-up, RL and evaluation images differ."""
    from cppo_trl.data.synthetic import make_synthetic_perception_dataset

    rows = make_synthetic_perception_dataset(num_samples, seed=seed, prompt_suffix=prompt_suffix, tasks=tasks)

    def add_completion(row):
        text = "\\boxed{" + row["solution"] + "}"
        return {"completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}]}

    return rows.map(add_completion, remove_columns=["solution", "task"])


def warmup_sft_config(output_dir, max_steps: int, batch_size: int, learning_rate: float, seed: int, **overrides):
    """The CPU SFT warm-up's settings (demo, `make compare`, `make agents`): cosine schedule, no checkpoints, no
    truncation (it could cut image tokens)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 10),
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        seed=seed,
        dataloader_num_workers=0,
        **overrides,
    )


def sft_warmup(
    base_model: str | Path,
    output_dir: str | Path,
    *,
    prompt_suffix: str | None,
    tasks: Sequence[str],
    num_samples: int = 1024,
    max_steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 1234,
) -> Path:
    """Supervised warm-up with TRL's `SFTTrainer` (completion-only loss); returns the checkpoint folder, which loads
    like the base model (weights + processor). Reused when `output_dir` already holds a finished warm-up with the
    same settings, so `compare.py` starts every arm from one identical policy."""
    from transformers import AutoProcessor
    from trl import SFTTrainer

    output_dir = Path(output_dir)
    marker = output_dir / "sft_warmup.json"
    settings = {
        "base_model": str(base_model),
        "prompt_suffix": prompt_suffix,
        "tasks": list(tasks),
        "num_samples": num_samples,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
    }
    if marker.exists() and json.loads(marker.read_text()).get("settings") == settings:
        logger.info("reusing SFT warm-up in %s", output_dir)
        return output_dir

    processor = AutoProcessor.from_pretrained(base_model, padding_side="left")
    args = warmup_sft_config(output_dir, max_steps, batch_size, learning_rate, seed)
    trainer = SFTTrainer(
        model=str(base_model),
        args=args,
        train_dataset=sft_dataset(num_samples, seed, prompt_suffix, tasks),
        processing_class=processor,
    )
    result = trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(str(output_dir))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    marker.write_text(json.dumps({"settings": settings, "train_loss": result.training_loss, "losses": losses}))
    logger.info("SFT warm-up: loss %.3f -> %.3f", losses[0] if losses else math.nan, losses[-1] if losses else 0)
    return output_dir


# ------------------------------------------------------------------------------------------------------ eval
def evaluate_accuracy(
    model_path: str | Path,
    dataset: datasets.Dataset,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    samples_per_prompt: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out accuracy@k as the paper measures it (k samples per prompt at temperature 1.0, averaged), through
    `cppo-eval`'s evaluator (`cppo_trl.evaluate.evaluate_model`): overall, per task, and a few decoded samples so the
    summary shows what the policy actually writes. Sampling, unlike greedy decoding, sees the policy's whole answer
    distribution move, which is what a few dozen RL steps change first."""
    from cppo_trl.evaluate import evaluate_model

    results = evaluate_model(
        model_path,
        {"held_out": dataset},
        num_samples=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    records = results["predictions"]
    tasks = dataset["task"] if "task" in dataset.column_names else ["all"] * len(dataset)
    samples = [
        {"task": task, "solution": record["solution"], "completion": record["completions"][0]}
        for task, record in list(zip(tasks, records, strict=True))[:8]
    ]
    return {
        "accuracy": results["average"],
        "std_over_draws": results["benchmarks"]["held_out"]["std"],
        "per_task": per_task_accuracy(records, tasks),
        "n": len(records),
        "samples": samples,
    }


def per_task_accuracy(records: Sequence[dict], tasks: Sequence[str]) -> dict[str, float]:
    """Mean per-sample score (accuracy@k) of each synthetic task."""
    per_task: dict[str, list[float]] = {}
    for record, task in zip(records, tasks, strict=True):
        per_task.setdefault(task, []).append(sum(record["scores"]) / len(record["scores"]))
    return {task: sum(values) / len(values) for task, values in sorted(per_task.items())}


# ------------------------------------------------------------------------------------------------------ RL
def run_recipe(recipe: str | Path, output_dir: str | Path, model_path: str | Path, overrides: Sequence[str] = ()):
    """Train through `cppo_trl.scripts.train.main` exactly as the CLI would; returns the `log_history` of the run."""
    from cppo_trl.scripts import train

    argv = ["--model_name_or_path", str(model_path), "--output_dir", str(output_dir), *overrides]
    script_args, training_args, model_args = parse_recipe(recipe, argv)
    train.main(script_args, training_args, model_args, recipe=str(recipe))
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return state["log_history"]


def metric_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric, skipping the final train-summary entry and non-finite values."""
    pairs = [
        (entry["step"], float(entry[key]))
        for entry in log_history
        if key in entry and "train_runtime" not in entry and math.isfinite(float(entry[key]))
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def plot_curves(log_history: list[dict], path: str | Path) -> Path:
    """One panel per CPPO curve (reward, CPL loss, selected-token and gated fractions) against the step."""
    from cppo_trl.core.plotting import headless_pyplot

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.2), squeeze=False)
    for ax, key in zip(axes[0], CURVE_METRICS, strict=True):
        steps, values = metric_series(log_history, key)
        ax.plot(steps, values, marker=".", lw=1)
        if len(values) >= REWARD_WINDOW:
            smooth = [_mean(values[max(0, i - REWARD_WINDOW + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, lw=2, label=f"mean of last {REWARD_WINDOW}")
            ax.legend(fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def summarize(log_history: list[dict], before: dict, after: dict) -> dict[str, Any]:
    """The numbers the demo prints and saves: reward first vs last steps, accuracy before/after, CPL statistics."""
    _, rewards = metric_series(log_history, "reward")
    window = max(1, min(REWARD_WINDOW, len(rewards) // 2))
    return {
        "steps": len(rewards),
        "reward_first": _mean(rewards[:window]),
        "reward_last": _mean(rewards[-window:]),
        "reward_window": window,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "accuracy_per_task_before": before["per_task"],
        "accuracy_per_task_after": after["per_task"],
        "held_out_n": after["n"],
        "cpl_loss_mean": _mean(metric_series(log_history, "cppo/cpl_loss")[1]),
        "gated_fraction_mean": _mean(metric_series(log_history, "cppo/gated_fraction")[1]),
        "selected_token_fraction_mean": _mean(metric_series(log_history, "cppo/selected_token_fraction")[1]),
        "reward_std_mean": _mean(metric_series(log_history, "reward_std")[1]),
        "samples_after": after["samples"],
    }


# ------------------------------------------------------------------------------------------------------ main
def build_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cppo_trl.scripts.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="Folder for the plots, pages, checkpoints and summary.")
    parser.add_argument("--recipe", default=str(DEMO_RECIPE), help="CPPO recipe to train with.")
    parser.add_argument("--quick", action="store_true", help="Tiny SFT/RL budgets (tests): checks the plumbing only.")
    parser.add_argument("--sft-steps", type=int, default=None, help="Override the SFT warm-up steps.")
    parser.add_argument("--rl-steps", type=int, default=None, help="Override the recipe's max_steps.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the summary dict (also written to `<out>/summary.json`)."""
    args = build_argparser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", stream=sys.stdout
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    sft_steps = args.sft_steps if args.sft_steps is not None else (8 if args.quick else 300)
    rl_overrides: list[str] = []
    rl_steps = args.rl_steps if args.rl_steps is not None else (2 if args.quick else None)
    if rl_steps is not None:
        rl_overrides += ["--max_steps", str(rl_steps)]
    if args.quick:
        rl_overrides += ["--synthetic_num_test", "8"]

    stages = tqdm(total=6, desc="CPPO demo", unit="stage", file=sys.stdout)
    from cppo_trl.testing import resolve_model_path

    script_args, training_args, model_args = parse_recipe(args.recipe, rl_overrides)
    base = resolve_model_path("tiny:qwen2_5_vl", script_args.tiny_model_family)
    held_out = held_out_split(script_args, training_args.seed)
    stages.update()

    stages.set_description("SFT warm-up")
    sft_dir = sft_warmup(
        base,
        out / "sft",
        prompt_suffix=script_args.prompt_suffix,
        tasks=script_args.synthetic_tasks,
        num_samples=64 if args.quick else 1024,
        max_steps=sft_steps,
    )
    stages.update()

    stages.set_description("held-out eval (SFT)")
    before = evaluate_accuracy(sft_dir, held_out)
    logger.info("held-out accuracy after SFT: %.3f %s", before["accuracy"], before["per_task"])
    stages.update()

    stages.set_description("CPPO training")
    cppo_dir = out / "cppo"
    log_history = run_recipe(args.recipe, cppo_dir, sft_dir, rl_overrides)
    stages.update()

    stages.set_description("held-out eval (CPPO)")
    after = evaluate_accuracy(cppo_dir, held_out)
    stages.update()

    stages.set_description("plots")
    from cppo_trl.scripts.visualize import inspect_perception_tokens, perturbation_sheet

    plot_curves(log_history, out / "training_curves.png")
    row = held_out[0]
    image = row["images"][0]
    prompt_text = next(p["text"] for p in row["prompt"][-1]["content"] if p["type"] == "text")
    inspection = inspect_perception_tokens(
        cppo_dir,
        image,
        prompt_text,
        None,
        out,
        top_fraction=training_args.perception_top_fraction,
        score=training_args.perception_score,
        seed=training_args.seed,
        params=training_args.perturbation_params,
        max_new_tokens=training_args.max_completion_length,
    )
    perturbation_sheet(
        image, training_args.perturbation_params, seed=training_args.seed, out_png=out / "perturbations.png"
    )
    stages.update()
    stages.close()

    summary = summarize(log_history, before, after)
    summary.update(
        recipe=str(args.recipe),
        quick=args.quick,
        sft_steps=sft_steps,
        wall_seconds=round(time.perf_counter() - started, 1),
        inspected_completion=inspection.completion_text,
        inspected_solution=row["solution"],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, out)
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The few lines a reader looks at after the run."""
    print("\n=== CPPO demo summary ===")
    print(f"RL steps: {summary['steps']}   wall: {summary['wall_seconds']:.0f} s")
    print(
        f"mean reward, first {summary['reward_window']} steps: {summary['reward_first']:.3f}  ->  "
        f"last {summary['reward_window']}: {summary['reward_last']:.3f}"
    )
    print(
        f"held-out accuracy@8, T=1 (n={summary['held_out_n']}): after SFT {summary['accuracy_before']:.3f}  ->  "
        f"after CPPO {summary['accuracy_after']:.3f}"
    )
    print(f"  per task before: {summary['accuracy_per_task_before']}")
    print(f"  per task after:  {summary['accuracy_per_task_after']}")
    print(
        f"CPL: mean cpl_loss {summary['cpl_loss_mean']:.4f}, gated fraction {summary['gated_fraction_mean']:.3f}, "
        f"selected-token fraction {summary['selected_token_fraction_mean']:.3f}"
    )
    print(f"artefacts in {out}: training_curves.png perception_tokens.html/.png perturbations.png summary.json")


if __name__ == "__main__":
    main()
