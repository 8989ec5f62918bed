"""Cases where the ranks of a 2-process run hold different work, run under `accelerate launch` (DDP or DeepSpeed), and
the same cases one rank at a time in one process (the agreeing twin: nothing to agree on).

Each step, rank r holds both rollouts of prompt r (shuffle off, 2 rollouts per prompt, 2 per device). Generation is
greedy, so a prompt's rollouts are the same tokens whatever the process layout; rewards follow the row's
`reward_pattern` by position, so advantages (hence CPPO's gate) are set by the case, not by chance.

Usage: accelerate launch ... tests/scripts/rank_cases.py MODEL_DIR OUTPUT_DIR MODE CASE [CASE ...]
(MODE: ddp | deepspeed | deepspeed-cuda, the last on GPUs for `make gpu-check`). Writes OUTPUT_DIR/<case>/rank{N}.json: the logged `cppo/*` / `papo/*` metrics of every step,
the loss each micro-batch's `compute_loss` returned on this rank, and how many dummy passes ran.
"""

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in conftest.py

from conftest import textured_image  # noqa: E402


QUESTION = "What colour is the top left block?"
# name: (method, per-rank prompts as (has image, reward pattern), config overrides, rank whose selection is empty)
CASES = {
    # one rank gated (rewards 0, 1 -> advantages -0.7, 0.7), the other not (0.5, 0.5 -> 0, 0)
    "gated_vs_none": ("cppo", [(True, "0,1"), (True, "0.5,0.5")], {}, None),
    # three rollouts per prompt, one view row per pass: rank 0 has 2 gated rows (2 passes), rank 1 has 1
    "uneven_chunks": (
        "cppo",
        [(True, "0,1,1"), (True, "0,0,1")],
        {"num_generations": 3, "per_device_train_batch_size": 3, "cpl_view_micro_batch_size": 1},
        None,
    ),
    # both ranks gated, but no perception token is selected on rank 1
    "no_token_selected": ("cppo", [(True, "0,1"), (True, "0,1")], {}, 1),
    # rank 1's prompts have no image: no views there (and, sharded, no vision tower)
    "cppo_text_rank": ("cppo", [(True, "0,1"), (False, "0,1")], {}, None),
    "grpo_text_rank": ("cppo", [(True, "0,1"), (False, "0,1")], {"cpl_weight": 0.0}, None),
    "papo_text_rank": ("papo", [(True, "0,1"), (False, "0,1")], {}, None),
}
STEPS = 2


def pattern_reward(completions, reward_pattern, **kwargs):
    """Each row's reward is its position's entry of the prompt's pattern (rows come grouped by prompt)."""
    rewards, position = [], {}
    for pattern in reward_pattern:
        values = [float(v) for v in pattern.split(",")]
        index = position.get(pattern, 0)
        rewards.append(values[index % len(values)])
        position[pattern] = index + 1
    return rewards


def rows(case: str, ranks: list[int]) -> list[dict]:
    """The dataset of `ranks`' prompts, in the order the sampler hands them to those ranks step after step."""
    prompts = CASES[case][1]
    out = []
    for step in range(STEPS):
        for rank in ranks:
            has_image, pattern = prompts[rank]
            content = [{"type": "text", "text": f"{QUESTION} ({rank})"}]
            row = {"prompt": [{"role": "user", "content": ([{"type": "image"}] if has_image else []) + content}]}
            row["images"] = [textured_image(10 * rank + step)] if has_image else []
            row["reward_pattern"] = pattern
            out.append(row)
    return out


def make_trainer(case: str, model_dir: str, output_dir: str, mode: str, ranks: list[int]):
    """The case's trainer on `ranks`' data; `mode` 'single' (one process), 'ddp', 'deepspeed' or 'deepspeed-cuda'."""
    from datasets import Dataset

    from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer

    method, _, overrides, _ = CASES[case]
    args = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 8,
        "max_steps": STEPS,
        "beta": 0.0,
        "loss_type": "bnpo",  # normalised per micro-batch: a rank's loss is its own, as in one process
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "seed": 0,
        "shuffle_dataset": False,
        "generation_kwargs": {"do_sample": False},
        # DeepSpeed on CPU: its CPU accelerator over gloo (`use_cpu=True` would be accelerate's own DDP on CPU).
        **{"deepspeed": {"use_cpu": False, "ddp_backend": "gloo"}, "deepspeed-cuda": {"use_cpu": False}}.get(
            mode, {"use_cpu": True}
        ),
        **overrides,
    }
    if method == "cppo":
        args = {"cppo_preset": "released", "cpl_weight": 1.0, **args}
        config, trainer_cls = CPPOConfig(**args), CPPOTrainer
    else:
        config, trainer_cls = PAPOConfig(perception_loss_weight=1.0, der_loss_weight1=0.1, **args), PAPOTrainer
    dataset = Dataset.from_list(rows(case, ranks))
    return trainer_cls(model=model_dir, reward_funcs=pattern_reward, args=config, train_dataset=dataset)


def run(trainer, case: str, rank: int) -> dict:
    """Train the case, recording every micro-batch loss and the dummy passes; the empty selection applies on `rank`."""
    from cppo_trl.trainer import cppo_trainer

    select = cppo_trainer.select_perception_tokens
    if CASES[case][3] == rank:
        cppo_trainer.select_perception_tokens = lambda anchor, removed, mask, *a, **k: torch.zeros_like(mask).bool()
    losses, seconds = [], {"dummy": 0.0, "agreement": 0.0}
    counts = {"dummy": 0}
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    def timed(method, name):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                counts[name] = counts.get(name, 0) + 1

        return wrapper

    trainer.compute_loss = recording
    trainer._dummy_forward = timed(trainer._dummy_forward, "dummy")
    trainer._agree_on_view_passes = timed(trainer._agree_on_view_passes, "agreement")
    trainer._agreed_passes = timed(trainer._agreed_passes, "agreement")
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        cppo_trainer.select_perception_tokens = select
    train_seconds = time.perf_counter() - start
    prefix = "cppo/" if "cppo" in trainer._metric_prefix else "papo/"
    logs = [{k: v for k, v in h.items() if k.startswith(prefix) or k == "loss"} for h in trainer.state.log_history]
    return {
        "logs": [h for h in logs if "loss" in h],
        "losses": losses,
        "dummy_passes": counts["dummy"],
        "dummy_seconds": seconds["dummy"],
        "agreement_seconds": seconds["agreement"],
        "train_seconds": train_seconds,
        "dummy_vision_passes": sum(vision.calls for vision in trainer._vision_passes),
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }


def main(model_dir: str, output_dir: str, mode: str, *cases: str) -> None:
    torch.set_num_threads(1)
    # A hang must fail with every rank's stack, well before the test's own timeout kills the job.
    faulthandler.dump_traceback_later(float(os.environ.get("CPPO_RANK_TIMEOUT", "150")), exit=True)
    for case in cases:
        out = Path(output_dir) / case
        trainer = make_trainer(case, model_dir, str(out), mode, ranks=[0, 1])
        result = run(trainer, case, trainer.accelerator.process_index)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(result, indent=1))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
