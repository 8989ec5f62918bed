"""GRPO vs PAPO vs CPPO for a VLM agent with a zoom tool, in miniature (`make agents`).

`python benchmarks/agents.py --out outputs/agents` (~7-12 min on 2 CPU cores; `--quick`: a plumbing check, ~30 s).

Task (`cppo_trl.data.zoom_task`): an 896-px image with a tiny 2x2 four-colour tile at the centre of each quarter; the
question names a quarter and asks for the colour of its tile's top-left cell. At the recipe's budget (128 x 128 px)
every tile is the same grey blob whatever the answer (measured, `measure_detail_visibility`, written to the report);
the `zoom_in` tool (`ZoomEnvironment`, TRL's `environment_factory`) shows the tile enlarged.

1. Data: the task's train split is written to `<out>/data/train.parquet` for the training script, the test split is
   kept for evaluation (never trained on).
2. One SFT warm-up of the tiny random Qwen3-VL with TRL's `SFTTrainer` on conversations rendered with TRL's own chat
   template and tool schema: user (image, question) -> assistant `zoom_in(box)` -> tool (the crop the tool returns)
   -> assistant `\\boxed{colour}` for 3 rows in 4, the direct answer for the 4th, loss on the assistant turns only.
   So the policy starts calling the tool at a measurable rate, and RL can move that rate.
3. GRPO, PAPO and CPPO arms, one switch apart on one method-neutral recipe
   (`recipes/tiny/agents/config_zoom_cpu.yaml`, `environment: zoom`), through the training script
   (`cppo_trl.scripts.train.main`), from the same SFT checkpoint, same steps, seed and learning rate.
4. Evaluation of the SFT start and every arm through TRL's own tool loop (a `CPPOTrainer` at λ = 0, i.e. GRPO,
   `evaluate()` on the held-out rows, `num_generations_eval` samples at the recipe's temperature): zoom rate,
   whether the zoom covered the asked cell, held-out accuracy (overall, with and without a zoom), and the
   perturbation audit: the same evaluation with the tool's image replaced by CPPO's information-removing view of it
   (patch occlusion, 80% of its vision tokens blacked out; same sampling seed). The drop is how much the answers
   depend on what the tool showed.

Writes `agents.json` (`"complete": false` until every arm is evaluated) and `agents.md` (the table) into `--out`.
A 0.3M-parameter model, one seed: read the spread of the numbers before their order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is experimental in TRL 1.16
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("agents")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "agents" / "config_zoom_cpu.yaml"
# One switch per arm on the method-neutral recipe, each method at its own paper's default weights (as make compare).
ARMS: dict[str, list[str]] = {
    "grpo": ["--cpl_weight", "0"],  # CPPOTrainer with λ = 0: GRPO's loss and gradients bit for bit (tested)
    "papo": ["--method", "papo"],  # the PAPO authors' PAPO-G: γ 0.02 on the masked images, η off
    # CPPO, paper preset (λ 0.02, gating, top-50% tokens), views over every image the policy saw (view_images "all",
    # the tool's crop included). Colour jitter would remove the answer of a colour question from the "preserving"
    # view, so it is left out of the preserving set, as in make compare.
    "cppo": ["--preserving_perturbations", "perspective", "rotation", "gaussian_blur"],
}
METHOD_METRICS = {"grpo": None, "papo": "papo/kl_prc", "cppo": "cppo/cpl_loss"}
CONDITIONS = ("original", "occluded")  # the tool's image as returned, or CPPO's removing view of it


# ------------------------------------------------------------------------------------------------------ SFT
def sft_conversation(row: dict[str, Any], with_tool: bool) -> list[dict[str, Any]]:
    """One warm-up conversation in TRL's message format: the prompt exactly as TRL builds it for a rollout
    (`prepare_multimodal_messages`), then either a `zoom_in` call on the row's `zoom_box`, the crop the tool returns
    (the real `ZoomEnvironment`) and the boxed answer, or the boxed answer at once."""
    from trl.data_utils import prepare_multimodal_messages

    from cppo_trl.data.zoom_tool import ZoomEnvironment

    messages = prepare_multimodal_messages(row["prompt"], images=row["images"])
    answer = {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{" + row["solution"] + "}"}]}
    if not with_tool:
        return [*messages, answer]
    environment = ZoomEnvironment()
    environment.reset(**row)
    call = {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox_2d": list(row["zoom_box"])}}}
    return [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "zoom_in", "content": environment.zoom_in(list(row["zoom_box"]))},
        answer,
    ]


class AssistantTurnsCollator:
    """Renders warm-up conversations (held in memory, looked up by the dataset's `index`) with the processor's chat
    template and the tool's schema, images expanded by the processor, and keeps the loss on the assistant turns only
    (`<|im_start|>assistant\\n` ... `<|im_end|>` inclusive): the tool's turn and the prompt are context, as in RL,
    where their `tool_mask` is 0."""

    def __init__(self, processor, conversations: list[list[dict[str, Any]]], tools: list):
        self.processor, self.conversations, self.tools = processor, conversations, tools
        tokenizer = processor.tokenizer
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        conversations = [self.conversations[int(feature["index"])] for feature in features]
        batch = self.processor.apply_chat_template(
            conversations,
            tools=self.tools,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "right"},
        )
        labels = torch.full_like(batch["input_ids"], -100)
        for row, ids in enumerate(batch["input_ids"].tolist()):
            for start, end in self.assistant_spans(ids):
                labels[row, start:end] = batch["input_ids"][row, start:end]
        batch["labels"] = labels
        return batch

    def assistant_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        spans, width, index = [], len(self.header), 0
        while index < len(ids):
            if ids[index : index + width] == self.header:
                start = index + width
                end = next((i for i in range(start, len(ids)) if ids[i] == self.end), len(ids) - 1) + 1
                spans.append((start, end))
                index = end
            else:
                index += 1
        return spans


def sft_warmup(
    base_model: str | Path,
    output_dir: Path,
    *,
    prompt_suffix: str | None,
    num_samples: int,
    max_steps: int,
    tool_fraction: float = 0.75,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 1234,
) -> tuple[Path, dict[str, Any]]:
    """The agent warm-up (see the module docstring); reused when `output_dir` holds one with the same settings."""
    import datasets
    from transformers import AutoProcessor
    from trl import SFTTrainer

    from cppo_trl.data.zoom_task import make_zoom_dataset
    from cppo_trl.data.zoom_tool import ZoomEnvironment
    from cppo_trl.scripts.demo import warmup_sft_config

    settings = {
        "base_model": str(base_model),
        "prompt_suffix": prompt_suffix,
        "num_samples": num_samples,
        "max_steps": max_steps,
        "tool_fraction": tool_fraction,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
    }
    marker = output_dir / "sft_warmup.json"
    if marker.exists() and json.loads(marker.read_text()).get("settings") == settings:
        logger.info("reusing the SFT warm-up in %s", output_dir)
        return output_dir, json.loads(marker.read_text())
    started = time.perf_counter()
    rows = make_zoom_dataset(num_samples, seed=seed, prompt_suffix=prompt_suffix)  # a stream of its own
    period = round(1 / (1 - tool_fraction)) if tool_fraction < 1 else 0
    conversations = [
        sft_conversation(row, with_tool=not period or index % period != period - 1) for index, row in enumerate(rows)
    ]
    processor = AutoProcessor.from_pretrained(base_model, padding_side="left")
    collator = AssistantTurnsCollator(processor, conversations, tools=[ZoomEnvironment().zoom_in])
    args = warmup_sft_config(
        output_dir,
        max_steps,
        batch_size,
        learning_rate,
        seed,
        remove_unused_columns=False,  # the collator needs the `index` column
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=str(base_model),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"index": list(range(len(conversations)))}),
        processing_class=processor,
        data_collator=collator,
    )
    result = trainer.train()
    trainer.save_model(str(output_dir))
    processor.save_pretrained(str(output_dir))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {
        "settings": settings,
        "train_loss": result.training_loss,
        "losses": losses,
        "tool_conversations": sum(any(m["role"] == "tool" for m in c) for c in conversations),
        "conversations": len(conversations),
        "seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps(info))
    logger.info("SFT warm-up: loss %.3f -> %.3f", losses[0] if losses else math.nan, losses[-1] if losses else 0)
    return output_dir, info


# ------------------------------------------------------------------------------------------------ evaluation
def occluded_environment(processor) -> type:
    """`ZoomEnvironment` whose crop is replaced by CPPO's information-removing view of it: `patch_occlusion` at the
    paper's 80% on the crop's own vision-token grid, seeded by the crop's pixels (the same crop, the same view)."""
    import torch

    from cppo_trl.core.images import PixelBudget
    from cppo_trl.core.perturbations import PerturbationParams, apply_perturbation
    from cppo_trl.data.zoom_tool import ZoomEnvironment

    budget = PixelBudget.from_processor(processor)
    params = PerturbationParams()

    class OccludedZoomEnvironment(ZoomEnvironment):
        def _enlarge(self, crop):
            image = super()._enlarge(crop)
            seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little") % (2**63 - 1)
            grid = budget.token_grid(*image.size) if budget is not None else None
            return apply_perturbation(image, "patch_occlusion", params, torch.Generator().manual_seed(seed), grid)

    return OccludedZoomEnvironment


def rollout_record(completion: list[dict[str, Any]], solution: str, score: float, cell: list[int] | None) -> dict:
    """What one evaluated rollout did: zoom calls (TRL's parsed `tool_calls`), whether a zoom returned an image and
    covered the asked cell, and whether the final boxed answer was right."""
    from cppo_trl.data.rewards import completion_text, extract_boxed

    boxes = []
    for message in completion:
        for call in message.get("tool_calls") or []:
            arguments = (call.get("function") or {}).get("arguments") or {}
            boxes.append(arguments.get("bbox_2d") if isinstance(arguments, dict) else None)
    tool_messages = [m for m in completion if m.get("role") == "tool"]
    zoomed = any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
        for m in tool_messages
    )

    def covers(box) -> bool:
        if cell is None or not isinstance(box, list | tuple) or len(box) != 4:
            return False
        try:
            return box[0] <= cell[0] and box[1] <= cell[1] and box[2] >= cell[2] and box[3] >= cell[3]
        except TypeError:
            return False

    final = next((m for m in reversed(completion) if m.get("role") == "assistant"), None)
    return {
        "calls": len(boxes),
        "tool_messages": len(tool_messages),
        "zoomed": zoomed,
        "covered_cell": zoomed and any(covers(box) for box in boxes),
        "boxed": final is not None and extract_boxed(completion_text([final])) is not None,
        "correct": bool(score),
        "solution": solution,
        "answer": extract_boxed(completion_text([final])) if final is not None else None,
    }


def evaluate_agent(
    model_dir: Path,
    held_out,
    condition: str,
    script_args,
    training_args,
    *,
    samples: int,
    batch_prompts: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out evaluation through TRL's own tool loop: a `CPPOTrainer` at λ = 0 (GRPO) with the recipe's processor,
    completion length and tool-call limit, `evaluate()` over `held_out` with `samples` rollouts per row at the
    recipe's temperature; the accuracy reward records every rollout (`rollout_record`)."""
    from cppo_trl import CPPOConfig, CPPOTrainer
    from cppo_trl.core.images import load_processor
    from cppo_trl.data.rewards import accuracy_reward
    from cppo_trl.data.zoom_tool import get_environment

    records: list[dict[str, Any]] = []

    def accuracy(completions, solution, answer_cell=None, **kwargs):
        scores = accuracy_reward(completions, solution)
        cells = answer_cell if answer_cell is not None else [None] * len(completions)
        for completion, gold, score, cell in zip(completions, solution, scores, cells, strict=True):
            records.append(rollout_record(completion, gold, score, cell))
        return scores

    processor = load_processor(str(model_dir), script_args.min_pixels, script_args.max_pixels)
    environment = get_environment(script_args.environment)
    if condition == "occluded":
        environment = occluded_environment(processor)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agents-eval-") as scratch:
        args = CPPOConfig(
            output_dir=scratch,
            cpl_weight=0.0,
            beta=0.0,
            per_device_train_batch_size=batch_prompts * samples,
            per_device_eval_batch_size=batch_prompts * samples,
            num_generations=samples,
            num_generations_eval=samples,
            max_completion_length=training_args.max_completion_length,
            max_tool_calling_iterations=training_args.max_tool_calling_iterations,
            temperature=training_args.temperature,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            seed=seed,
            dataloader_num_workers=0,
        )
        trainer = CPPOTrainer(
            model=str(model_dir),
            reward_funcs=[accuracy],
            args=args,
            train_dataset=held_out,
            eval_dataset=held_out,
            processing_class=processor,
            environment_factory=environment,
        )
        metrics = trainer.evaluate()
    if len(records) != len(held_out) * samples:
        raise RuntimeError(f"recorded {len(records)} rollouts, expected {len(held_out)} x {samples}")
    return {
        **summarize_records(records),
        "eval_reward": metrics.get("eval_reward"),
        "eval_tool_call_frequency": metrics.get("eval_tools/call_frequency"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    zoomed = [r for r in records if r["zoomed"]]
    direct = [r for r in records if not r["zoomed"]]
    return {
        "rollouts": len(records),
        "tool_call_rate": _mean(r["calls"] > 0 for r in records),
        "zoom_rate": _mean(r["zoomed"] for r in records),
        "covered_cell_rate": _mean(r["covered_cell"] for r in records),
        "boxed_rate": _mean(r["boxed"] for r in records),
        "accuracy": _mean(r["correct"] for r in records),
        "accuracy_zoomed": _mean(r["correct"] for r in zoomed),
        "accuracy_direct": _mean(r["correct"] for r in direct),
        "n_zoomed": len(zoomed),
    }


# ------------------------------------------------------------------------------------------------------ runs
def run_arm(
    name: str, sft_dir: Path, out: Path, overrides: list[str], held_out, evaluation: dict[str, Any], parsed
) -> dict[str, Any]:
    """One training run of one arm (skipped when it already finished), then its evaluation in both conditions;
    the result is cached in `<run>/result.json`."""
    from cppo_trl.scripts.demo import metric_series, run_recipe

    run_dir = out / "runs" / name
    result_file, state_file = run_dir / "result.json", run_dir / "trainer_state.json"
    fingerprint = settings_fingerprint(
        RECIPE.read_text(), ARMS[name], overrides, sft_dir, {**evaluation, "held_out": len(held_out)}
    )
    if result_file.exists() and json.loads(result_file.read_text()).get("fingerprint") == fingerprint:
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    trained = state_file.exists() and (run_dir / "fingerprint.json").exists()
    if not trained or json.loads((run_dir / "fingerprint.json").read_text()) != fingerprint["train"]:
        shutil.rmtree(run_dir, ignore_errors=True)  # another recipe, arm or start: train again
        run_recipe(RECIPE, run_dir, sft_dir, [*ARMS[name], *overrides])
        (run_dir / "fingerprint.json").write_text(json.dumps(fingerprint["train"]))
    log_history = json.loads(state_file.read_text())["log_history"]
    script_args, training_args, _ = parsed
    conditions = {
        condition: evaluate_agent(run_dir, held_out, condition, script_args, training_args, **evaluation)
        for condition in CONDITIONS
    }
    steps, rewards = metric_series(log_history, "reward")
    metric = METHOD_METRICS[name]
    result = {
        "arm": name,
        "switch": ARMS[name],
        "train_seconds": next(e["train_runtime"] for e in log_history if "train_runtime" in e),
        "step_seconds": _mean(metric_series(log_history, "step_time")[1]),
        "reward_steps": steps,
        "reward": rewards,
        "train_tool_call_frequency": metric_series(log_history, "tools/call_frequency")[1],
        "method_metric": metric,
        "method_metric_values": metric_series(log_history, metric)[1] if metric else [],
        "conditions": conditions,
        "seconds": round(time.perf_counter() - started, 1),
        "fingerprint": fingerprint,
    }
    result_file.write_text(json.dumps(result))
    return result


def settings_fingerprint(recipe_text: str, switch: list[str], overrides: list[str], start: Path, evaluation: dict):
    """What a cached run or evaluation depends on: a finished one is reused only when all of it is unchanged."""
    marker = Path(start) / "sft_warmup.json"
    start_settings = json.loads(marker.read_text()).get("settings") if marker.exists() else str(start)
    train = {
        "recipe": hashlib.sha256(recipe_text.encode()).hexdigest(),
        "switch": list(switch),
        "overrides": list(overrides),
        "start": start_settings,
    }
    return {"train": train, "evaluation": dict(evaluation)}


def table_row(name: str, conditions: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    original, occluded = conditions["original"], conditions["occluded"]
    row = {
        "arm": name,
        "zoom_rate": original["zoom_rate"],
        "covered_cell_rate": original["covered_cell_rate"],
        "accuracy": original["accuracy"],
        "accuracy_zoomed": original["accuracy_zoomed"],
        "accuracy_direct": original["accuracy_direct"],
        "accuracy_occluded": occluded["accuracy"],
        "accuracy_zoomed_occluded": occluded["accuracy_zoomed"],
        "dependence_on_tool_image": original["accuracy"] - occluded["accuracy"],
    }
    if result is not None:
        tail = result["reward"][-max(1, len(result["reward"]) // 4) :]
        calls = result["train_tool_call_frequency"]
        row.update(
            step_seconds=result["step_seconds"],
            train_reward_last_quarter=_mean(tail),
            train_tool_calls_first=_mean(calls[: max(1, len(calls) // 4)]),
            train_tool_calls_last=_mean(calls[-max(1, len(calls) // 4) :]),
        )
    return row


def _f(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    visibility, steps = payload["visibility"], payload["steps"]
    status = (
        "" if payload["complete"] else f" **INCOMPLETE: {payload['arms_done']} of {payload['arms_planned']} arms.**"
    )
    rows = payload["table"]
    n = rows[0]["n"] if rows else 0
    lines = [
        f"Zoom task, held-out {payload['held_out_rows']} rows x {payload['samples']} samples at T = "
        f"{payload['temperature']:g} (n = {n} "
        f"rollouts), after {steps} RL steps from the same SFT start; one seed.{status}",
        "",
        f"Is the detail legible? After the processor's resize, the answer changes a pixel of the whole image by at "
        f"most {visibility['full_answer_contrast']:.1f} of 255 on average (crop: "
        f"{visibility['zoom_answer_contrast']:.1f}); a decoder reading the cell's exact pixels is right "
        f"{visibility['full_decoder_accuracy']:.2f} of the time in the whole image and "
        f"{visibility['zoom_decoder_accuracy']:.2f} in the crop (chance 0.25).",
        "",
        "| arm | zoom rate | zoom on the cell | held-out accuracy | when zoomed | without zoom | tool image occluded "
        "| dependence on the tool image | train tool calls, first → last 25% | train reward, last 25% | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        calls = (
            f"{_f(row.get('train_tool_calls_first'), 2)} → {_f(row.get('train_tool_calls_last'), 2)}"
            if "step_seconds" in row
            else "—"
        )
        lines.append(
            f"| {row['arm']} | {_f(row['zoom_rate'])} | {_f(row['covered_cell_rate'])} | {_f(row['accuracy'])} "
            f"| {_f(row['accuracy_zoomed'])} | {_f(row['accuracy_direct'])} | {_f(row['accuracy_occluded'])} "
            f"| {row['dependence_on_tool_image']:+.3f} | {calls} | {_f(row.get('train_reward_last_quarter'))} "
            f"| {_f(row.get('step_seconds'), 2)} |"
        )
    lines += [
        "",
        "zoom rate: rollouts whose zoom returned an image; zoom on the cell: ... whose box covered the asked cell; "
        "tool image occluded: the same evaluation (same seed) with the tool's image replaced by CPPO's removing view "
        "(80% of its vision tokens blacked out); dependence: accuracy minus that.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/agents")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per arm (default: the recipe's).")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=48, help="Held-out rows evaluated.")
    parser.add_argument("--samples", type=int, default=4, help="Rollouts per held-out row (T = 1).")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Subset of {list(ARMS)}.")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets everywhere: checks the plumbing only.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch threads (tiny models are overhead-bound: 1 is fastest on a busy CPU).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")

    import torch

    from cppo_trl.core.images import load_processor
    from cppo_trl.data.zoom_task import make_zoom_splits, measure_detail_visibility, write_zoom_file

    torch.set_num_threads(args.threads)
    from cppo_trl.scripts.demo import parse_recipe
    from cppo_trl.testing import resolve_model_path

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held_out_rows = 4 if args.quick else args.held_out
    samples = 2 if args.quick else args.samples
    steps = 1 if args.quick else args.steps
    train_file = out / "data" / "train.parquet"
    overrides = ["--dataset_name", str(train_file)] + (["--max_steps", str(steps)] if steps else [])
    if args.quick:  # shorter completions: the plumbing, not the task
        overrides += ["--per_device_train_batch_size", "4", "--num_generations", "2"]
    parsed = parse_recipe(RECIPE, overrides)
    script_args, training_args, _ = parsed

    # 1. data: the train split for the training script, the test split for evaluation (one random stream)
    # at least one row per rollout of the run (steps x per_device_train_batch_size), so prompts rarely repeat
    num_train = 16 if args.quick else max(256, training_args.max_steps * training_args.per_device_train_batch_size)
    splits = make_zoom_splits(
        num_train, held_out_rows, seed=training_args.seed, prompt_suffix=script_args.prompt_suffix
    )
    write_zoom_file(splits["train"], train_file)
    write_zoom_file(splits["test"], out / "data" / "test.parquet")
    held_out = splits["test"]
    base = resolve_model_path("tiny:qwen3_vl", script_args.tiny_model_family)
    processor = load_processor(base, script_args.min_pixels, script_args.max_pixels)
    visibility = measure_detail_visibility(processor, num_samples=2 if args.quick else 32)
    logger.info("detail visibility at the recipe's budget: %s", visibility)

    # 2. one SFT warm-up, shared by every arm
    sft_dir, sft_info = sft_warmup(
        base,
        out / "sft",
        prompt_suffix=script_args.prompt_suffix,
        num_samples=32 if args.quick else 1024,
        max_steps=2 if args.quick else args.sft_steps,
        batch_size=4 if args.quick else 16,
    )
    evaluation = {"samples": samples, "batch_prompts": 2 if args.quick else 16}
    sft_file = out / "sft_eval.json"
    fingerprint = settings_fingerprint(
        RECIPE.read_text(), [], overrides, sft_dir, {**evaluation, "held_out": len(held_out)}
    )
    if sft_file.exists() and json.loads(sft_file.read_text()).get("fingerprint") == fingerprint:
        sft_conditions = json.loads(sft_file.read_text())["conditions"]
    else:
        sft_conditions = {
            condition: evaluate_agent(sft_dir, held_out, condition, script_args, training_args, **evaluation)
            for condition in CONDITIONS
        }
        sft_file.write_text(json.dumps({"fingerprint": fingerprint, "conditions": sft_conditions}))

    # 3-4. the arms, evaluated as they finish
    results: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    for arm in arms:
        results[arm] = run_arm(arm, sft_dir, out, overrides, held_out, evaluation, parsed)
        table = [table_row("SFT start", sft_conditions, None)] + [
            table_row(name, result["conditions"], result) for name, result in results.items()
        ]
        for row in table:
            row["n"] = held_out_rows * samples
        payload = {
            "complete": len(results) == len(arms),
            "arms_done": len(results),
            "arms_planned": len(arms),
            "quick": args.quick,
            "steps": training_args.max_steps,
            "recipe": str(RECIPE.relative_to(ROOT)),
            "arms": {name: ARMS[name] for name in arms},
            "held_out_rows": held_out_rows,
            "samples": samples,
            "temperature": training_args.temperature,
            "learning_rate": training_args.learning_rate,
            "visibility": visibility,
            "sft": {**sft_info, "conditions": sft_conditions},
            "table": table,
            "runs": results,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        (out / "agents.json").write_text(json.dumps(payload, indent=2) + "\n")
        write_markdown(payload, out / "agents.md")
    print((out / "agents.md").read_text())
    return payload


if __name__ == "__main__":
    main()
