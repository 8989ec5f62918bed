"""GRPO vs PAPO vs CPPO where perception is the bottleneck: the CPPO paper's comparison in miniature.

`python benchmarks/compare.py --out outputs/compare` (`make compare`; ~20-40 min on 2 CPU cores, not part of the tests).
Task (`cppo_trl.data.synthetic.PRIOR_TASK`): "What is the color of the <shape> in the image?" In training the shape gives the
colour 80% of the time, a prior the text offers and the image must override; the held-out split draws colours
uniformly, so ~3/4 of its questions are *prior-conflicting* (the shape's training colour is wrong).

Every arm trains through `cppo_trl.cppo.main` on one method-neutral recipe (`recipes/tiny/compare/config_prior_cpu.yaml`)
from the same SFT warm-up checkpoint (`cppo_trl.scripts.demo.sft_warmup`, trained on the train distribution, prior included),
with the same steps, batch, seeds and learning rate; arms differ by the switches in `ARMS`. Each run is evaluated
with `evaluate_held_out`: accuracy@8 at temperature 1.0 by `cppo-eval`'s evaluator (`cppo_trl.evaluate.evaluate_model`,
predictions kept in `<run>/eval`), overall and on the prior-conflicting and prior-aligned rows. A finished run is not
retrained; `--reevaluate` evaluates every finished run again (after an evaluator change). Writes `compare.json`
(`"complete": false` until every run is in), `compare.md` (table) and `compare.png`.
A 0.3M-parameter model on a toy task: read the spread before reading the means.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from cppo_trl.evaluate import evaluate_model
from cppo_trl.scripts.demo import held_out_split, metric_series, parse_recipe, run_recipe, sft_warmup


logger = logging.getLogger("compare")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "compare" / "config_prior_cpu.yaml"
# One switch per arm on the method-neutral recipe; each method at its own paper's default weights.
ARMS: dict[str, list[str]] = {
    "grpo": ["--cpl_weight", "0"],  # CPPOTrainer with λ = 0: GRPO's loss and gradients bit for bit (tested)
    "papo": ["--method", "papo"],  # the PAPO authors' PAPO-G: γ 0.02 on the masked image, η off
    # CPPO, paper preset (λ 0.02, gating, top-50% tokens); colour jitter would remove the answer of a colour question
    # from the "information-preserving" view, so it is left out of the preserving set, as in the demo recipe.
    "cppo": ["--preserving_perturbations", "perspective", "rotation", "gaussian_blur"],
}
METHOD_METRICS = {"grpo": None, "papo": "papo/kl_prc", "cppo": "cppo/cpl_loss"}


def evaluate_held_out(model_dir: Path, held_out, output_dir: Path) -> dict:
    """The comparison's one evaluation call: accuracy@8 at T = 1 through `cppo-eval`'s evaluator, overall and on the
    prior-conflicting and prior-aligned held-out rows (mean over rows of each row's mean score over its 8 samples)."""
    results = evaluate_model(
        model_dir,
        {"held_out": held_out},
        output_dir=output_dir,
        overwrite_output_dir=True,  # a re-evaluation after an evaluator change replaces the old predictions
        num_samples=8,
        max_new_tokens=8,  # the synthetic answers are short: \boxed{colour} and end of turn
        batch_size=16,
        seed=0,
    )
    scores = [sum(record["scores"]) / len(record["scores"]) for record in results["predictions"]]
    if len(scores) != len(held_out):
        raise RuntimeError(f"the evaluator scored {len(scores)} of {len(held_out)} held-out rows; cannot split them")
    flags = held_out["prior_conflict"]
    conflict = [score for score, flag in zip(scores, flags, strict=True) if flag]
    aligned = [score for score, flag in zip(scores, flags, strict=True) if not flag]
    return {
        "accuracy": _mean(scores),
        "conflict_accuracy": _mean(conflict),
        "aligned_accuracy": _mean(aligned),
        "std_over_draws": results["benchmarks"]["held_out"]["std"],
        "n": len(scores),
        "n_conflict": len(conflict),
    }


def run_arm(
    name: str, seed: int, sft_dir: Path, out: Path, recipe: Path, overrides: list[str], held_out, reevaluate: bool
) -> dict:
    """One training run of one arm and seed (skipped when the run already finished), then its held-out evaluation;
    the result is cached in `<run>/result.json` (recomputed from the finished run with `reevaluate`)."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    result_file, state_file = run_dir / "result.json", run_dir / "trainer_state.json"
    if result_file.exists() and not reevaluate:
        return json.loads(result_file.read_text())
    if not state_file.exists():  # `cppo.main` writes the trainer state when training has finished
        run_recipe(recipe, run_dir, sft_dir, [*ARMS[name], "--seed", str(seed), *overrides])
    log_history = json.loads(state_file.read_text())["log_history"]
    evaluation = evaluate_held_out(run_dir, held_out, run_dir / "eval")
    steps, rewards = metric_series(log_history, "reward")
    metric = METHOD_METRICS[name]
    result = {
        "arm": name,
        "seed": seed,
        "train_seconds": next(e["train_runtime"] for e in log_history if "train_runtime" in e),
        "step_seconds": _mean(metric_series(log_history, "step_time")[1]),
        **evaluation,
        "reward_steps": steps,
        "reward": rewards,
        "method_metric": metric,
        "method_metric_values": metric_series(log_history, metric)[1] if metric else [],
    }
    result_file.write_text(json.dumps(result))
    return result


def _mean(values):
    return statistics.fmean(values) if values else float("nan")


def _spread(values: list[float]) -> dict:
    return {"mean": _mean(values), "min": min(values), "max": max(values)}


def aggregate(results: list[dict], sft: dict) -> dict[str, dict]:
    """Per arm over seeds: held-out accuracy (overall, prior-conflicting, prior-aligned) as mean/min/max, the mean train
    reward of the last quarter of the steps, and seconds per optimizer step (also relative to GRPO's)."""
    table = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        tail = [_mean(r["reward"][-max(1, len(r["reward"]) // 4) :]) for r in runs]
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            "accuracy": _spread([r["accuracy"] for r in runs]),
            "conflict_accuracy": _spread([r["conflict_accuracy"] for r in runs]),
            "aligned_accuracy": _spread([r["aligned_accuracy"] for r in runs]),
            "gain_vs_sft": _mean([r["accuracy"] for r in runs]) - sft["accuracy"],
            "final_reward_mean": _mean(tail),
            "step_seconds": _mean([r["step_seconds"] for r in runs]),
        }
    if "grpo" in table:
        for row in table.values():
            row["step_time_vs_grpo"] = row["step_seconds"] / table["grpo"]["step_seconds"]
    return table


def _cell(spread: dict) -> str:
    return f"{spread['mean']:.3f} [{spread['min']:.3f}, {spread['max']:.3f}]"


def write_markdown(table: dict, sft: dict, steps: int, done: int, planned: int, path: Path) -> None:
    status = "" if done == planned else f" **INCOMPLETE: {done} of {planned} runs so far.**"
    lines = [
        f"Held-out accuracy@8, T = 1 (n = {sft['n']}, {sft['n_conflict']} prior-conflicting) after {steps} RL steps "
        f"from the same SFT start (SFT alone: {sft['accuracy']:.3f} overall, {sft['conflict_accuracy']:.3f} "
        f"prior-conflicting, {sft['aligned_accuracy']:.3f} prior-aligned); mean [min, max] over seeds.{status}",
        "",
        "| arm | seeds | held-out accuracy | prior-conflicting | prior-aligned | gain vs SFT | train reward, last 25% "
        "| s / step | step time vs GRPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        lines.append(
            f"| {arm} | {len(row['seeds'])} | {_cell(row['accuracy'])} | {_cell(row['conflict_accuracy'])} "
            f"| {_cell(row['aligned_accuracy'])} | {row['gain_vs_sft']:+.3f} | {row['final_reward_mean']:.3f} "
            f"| {row['step_seconds']:.2f} | {row.get('step_time_vs_grpo', float('nan')):.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], sft: dict, path: Path) -> None:
    """Left: held-out accuracy per arm (bars: mean over seeds, dots: seeds), overall, prior-conflicting and
    prior-aligned, with the SFT start as lines. Right: train reward, 10-step rolling average (mean over seeds, band: min-max over seeds)."""
    from cppo_trl.core.plotting import headless_pyplot

    plt = headless_pyplot()
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in results)]
    groups = (
        ("accuracy", "overall"),
        ("conflict_accuracy", "prior-conflicting"),
        ("aligned_accuracy", "prior-aligned"),
    )
    for offset, (key, label) in enumerate(groups):
        positions = [i + (offset - 1) * 0.27 for i in range(len(arms))]
        values = [[r[key] for r in results if r["arm"] == arm] for arm in arms]
        bars.bar(positions, [_mean(v) for v in values], width=0.25, label=label, alpha=0.75)
        for x, seeds in zip(positions, values, strict=True):
            bars.scatter([x] * len(seeds), seeds, color="black", s=12, zorder=3)
        bars.axhline(sft[key], color=f"C{offset}", ls="--", lw=1, label=f"SFT start, {label}")
    bars.set_xticks(range(len(arms)), [arm.upper() for arm in arms])
    bars.set_ylabel("held-out accuracy@8 (T = 1)")
    bars.set_title("held-out accuracy (dots: seeds)")
    bars.legend(fontsize=6, ncol=2, loc="upper center")
    bars.set_ylim(0, 1.15)
    bars.grid(alpha=0.3, axis="y")
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        length = min(len(r["reward"]) for r in runs)
        steps = runs[0]["reward_steps"][:length]
        columns = list(zip(*(r["reward"][:length] for r in runs), strict=True))
        window = 10

        def rolling(values, window=window):
            return [_mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]

        curves.plot(steps, rolling([_mean(c) for c in columns]), label=f"{arm.upper()} (mean of {len(runs)} seeds)")
        curves.fill_between(steps, rolling([min(c) for c in columns]), rolling([max(c) for c in columns]), alpha=0.15)
    curves.set_xlabel("step")
    curves.set_ylabel("train reward (accuracy)")
    curves.set_title("train reward, 10-step average (band: min-max over seeds)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated training seeds.")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the recipe's).")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Subset of {list(ARMS)}.")
    parser.add_argument(
        "--quick", action="store_true", help="2 RL steps, 4 SFT steps, 8 held-out rows: plumbing only."
    )
    parser.add_argument(
        "--reevaluate", action="store_true", help="Evaluate finished runs (and the SFT start) again, without training."
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ARM:FIELD=VALUE",
        help="Change one arm's field for a sensitivity run, e.g. --set papo:perception_loss_weight=0.2 (repeatable).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    for change in args.set:
        arm, _, assignment = change.partition(":")
        field, _, value = assignment.partition("=")
        if arm not in ARMS or not field or not value:
            parser.error(f"--set expects ARM:FIELD=VALUE with ARM in {list(ARMS)}, got {change!r}")
        ARMS[arm] = [*ARMS[arm], f"--{field}", value]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cppo_trl.testing import resolve_model_path

    overrides = ["--synthetic_num_test", "8"] if args.quick else []
    steps_override = 2 if args.quick else args.steps
    overrides += ["--max_steps", str(steps_override)] if steps_override else []
    script_args, training_args, _ = parse_recipe(args.recipe, overrides)
    held_out = held_out_split(script_args, training_args.seed)  # the recipe's seed: one test set for every run
    base = resolve_model_path("tiny:qwen2_5_vl", script_args.tiny_model_family)
    sft_dir = sft_warmup(
        base,
        out / "sft",
        prompt_suffix=script_args.prompt_suffix,
        tasks=script_args.synthetic_tasks,
        num_samples=64 if args.quick else 1024,
        max_steps=4 if args.quick else args.sft_steps,
    )
    sft = evaluate_held_out(sft_dir, held_out, out / "sft_eval")
    logger.info(
        "SFT start: held-out accuracy %.3f (prior-conflicting %.3f)", sft["accuracy"], sft["conflict_accuracy"]
    )

    results = []
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    planned = len(seeds) * len(arms)
    for seed in seeds:  # seed-major: an interrupted run still has every arm for the first seeds
        for arm in arms:
            result = run_arm(arm, seed, sft_dir, out, Path(args.recipe), overrides, held_out, args.reevaluate)
            logger.info(
                "%s seed %d: accuracy %.3f, prior-conflicting %.3f (%.0f s)",
                arm,
                seed,
                result["accuracy"],
                result["conflict_accuracy"],
                result["train_seconds"],
            )
            results.append(result)
            table = aggregate(results, sft)
            payload = {
                "complete": len(results) == planned,
                "runs_done": len(results),
                "runs_planned": planned,
                "steps": training_args.max_steps,
                "recipe": str(args.recipe),
                "arms": {arm: ARMS[arm] for arm in arms},
                "sft": sft,
                "table": table,
                "runs": results,
            }
            (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
            write_markdown(table, sft, training_args.max_steps, len(results), planned, out / "compare.md")
            plot(results, sft, out / "compare.png")
    print((out / "compare.md").read_text())
    return payload


if __name__ == "__main__":
    main()
