"""GRPO vs CPPO vs CPL-without-gating on the synthetic perception task, several seeds, one budget, one SFT start.

`python benchmarks/compare.py --out outputs/compare` (`make compare`; ~30 min on 2 CPU cores, not part of the tests).
Every arm trains through `cppo_trl.cppo.main` on the demo recipe (`recipes/tiny/cppo/config_demo_cpu.yaml`) from the
same SFT warm-up checkpoint (`cppo_trl.demo.sft_warmup`), with the same steps and batch; arms differ by one flag:

- `grpo`: `--cpl_weight 0` (exactly GRPO);
- `cppo`: the recipe as is (paper preset, CPL on advantage-gated rollouts);
- `cpl_no_gating`: `--advantage_gating false` (CPL on every rollout, the gating ablation).

Held-out accuracy is accuracy@8 at temperature 1.0 on the recipe's test split, identical for every arm and seed, measured
by `cppo-eval`'s evaluator (`cppo_trl.evaluate.evaluate_model`, each run's predictions kept in `<run>/eval`). Writes `compare.json`, `compare.md` (table) and `compare.png` (reward curves, mean with the
min-max band over seeds). A tiny model on a toy task: read the spread before reading the means.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from cppo_trl.demo import (
    DEMO_RECIPE,
    held_out_split,
    metric_series,
    parse_recipe,
    per_task_accuracy,
    run_recipe,
    sft_warmup,
)
from cppo_trl.evaluate import evaluate_model


logger = logging.getLogger("compare")

ARMS: dict[str, list[str]] = {
    "grpo": ["--cpl_weight", "0"],
    "cppo": [],
    "cpl_no_gating": ["--advantage_gating", "false"],
}


def run_arm(name: str, seed: int, sft_dir: Path, out: Path, recipe: str, steps: int | None, held_out) -> dict:
    """One training run of one arm and seed, then its held-out evaluation; cached in `<run>/result.json`."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    overrides = [*ARMS[name], "--seed", str(seed)] + (["--max_steps", str(steps)] if steps else [])
    started = time.perf_counter()
    log_history = run_recipe(recipe, run_dir, sft_dir, overrides)
    seconds = time.perf_counter() - started
    evaluation = held_out_accuracy(run_dir, held_out, run_dir / "eval")
    result = {
        "arm": name,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "accuracy": evaluation["accuracy"],
        "per_task": evaluation["per_task"],
        "reward_steps": metric_series(log_history, "reward")[0],
        "reward": metric_series(log_history, "reward")[1],
        "cpl_loss": metric_series(log_history, "cppo/cpl_loss")[1],
        "gated_fraction": metric_series(log_history, "cppo/gated_fraction")[1],
    }
    result_file.write_text(json.dumps(result))
    return result


def held_out_accuracy(model_dir: Path, held_out, output_dir: Path) -> dict:
    """accuracy@8 at T = 1 (the paper's protocol, 8 new tokens: the synthetic answers are short), per task too."""
    results = evaluate_model(
        model_dir,
        {"held_out": held_out},
        output_dir=output_dir,
        overwrite_output_dir=True,  # a retrained SFT start has a new fingerprint: re-evaluate it
        num_samples=8,
        max_new_tokens=8,
        batch_size=16,
        seed=0,
    )
    tasks = held_out["task"] if "task" in held_out.column_names else ["all"] * len(held_out)
    return {
        "accuracy": results["average"],
        "per_task": per_task_accuracy(results["predictions"], tasks),
        "n": len(held_out),
    }


def _mean(values):
    return statistics.fmean(values) if values else float("nan")


def aggregate(results: list[dict], baseline: float) -> dict[str, dict]:
    """Per arm: accuracy mean/min/max over seeds, and the mean reward of the last quarter of the steps."""
    table = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        accuracies = [r["accuracy"] for r in runs]
        tail = [_mean(r["reward"][-max(1, len(r["reward"]) // 4) :]) for r in runs]
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            "accuracy_mean": _mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "accuracy_gain_vs_sft": _mean(accuracies) - baseline,
            "final_reward_mean": _mean(tail),
            "cpl_loss_mean": _mean([_mean(r["cpl_loss"]) for r in runs]),
            "train_seconds_mean": _mean([r["train_seconds"] for r in runs]),
        }
    return table


def write_markdown(table: dict, baseline: dict, steps: int, n: int, path: Path) -> None:
    lines = [
        f"Held-out accuracy@8, T=1 (n={n}) after {steps} RL steps from the same SFT start "
        f"(SFT alone: {baseline['accuracy']:.3f}); mean [min, max] over seeds.",
        "",
        "| arm | seeds | held-out accuracy | gain vs SFT | reward, last 25% of steps | mean CPL loss | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        lines.append(
            f"| {arm} | {len(row['seeds'])} | {row['accuracy_mean']:.3f} [{row['accuracy_min']:.3f}, "
            f"{row['accuracy_max']:.3f}] | {row['accuracy_gain_vs_sft']:+.3f} | {row['final_reward_mean']:.3f} | "
            f"{row['cpl_loss_mean']:.4f} | {row['train_seconds_mean']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    from cppo_trl.visualize import _matplotlib

    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        length = min(len(r["reward"]) for r in runs)
        steps = runs[0]["reward_steps"][:length]
        columns = list(zip(*(r["reward"][:length] for r in runs), strict=True))
        ax.plot(steps, [_mean(c) for c in columns], label=f"{arm} (mean of {len(runs)})")
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train reward (accuracy)")
    ax.set_title("GRPO vs CPPO vs CPL without gating (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--recipe", default=str(DEMO_RECIPE))
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the recipe's).")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Subset of {list(ARMS)}.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cppo_trl.cppo import resolve_model_path

    script_args, training_args, _ = parse_recipe(args.recipe)
    steps = args.steps or training_args.max_steps
    held_out = held_out_split(script_args, training_args.seed)  # the recipe's seed: one test set for every run
    base = resolve_model_path("tiny:qwen2_5_vl", script_args.tiny_model_family)
    sft_dir = sft_warmup(
        base,
        out / "sft",
        prompt_suffix=script_args.prompt_suffix,
        tasks=script_args.synthetic_tasks,
        max_steps=args.sft_steps,
    )
    baseline = held_out_accuracy(sft_dir, held_out, out / "sft" / "eval")
    logger.info("SFT start: held-out accuracy %.3f", baseline["accuracy"])

    results = []
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    for seed in seeds:  # seed-major: an interrupted run still has every arm for the first seeds
        for arm in arms:
            result = run_arm(arm, seed, sft_dir, out, args.recipe, args.steps, held_out)
            logger.info("%s seed %d: accuracy %.3f (%.0f s)", arm, seed, result["accuracy"], result["train_seconds"])
            results.append(result)
            table = aggregate(results, baseline["accuracy"])
            payload = {"steps": steps, "sft_accuracy": baseline["accuracy"], "table": table, "runs": results}
            (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
            write_markdown(table, baseline, steps, baseline["n"], out / "compare.md")
            plot(results, out / "compare.png")
    print((out / "compare.md").read_text())
    return payload


if __name__ == "__main__":
    main()
