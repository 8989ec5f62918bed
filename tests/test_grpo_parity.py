"""With their extra weight at 0, CPPOTrainer and PAPOTrainer are `trl.GRPOTrainer`: whole training loops on the same
seed and data sample the same completions and log the same losses step by step, and end with the same weights, also
on images off the processor's grid, above its pixel cap and below its minimum (which the processor alone resizes).

So the GRPO arm of any comparison on these rails is TRL's GRPO.
"""

import pytest
import torch
from conftest import COMMON, hashed_reward, textured_image
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer
from cppo_trl.core.images import PixelBudget, load_processor


SIZES = [(300, 200), (97, 131), (3000, 2000), (45, 20)]  # above the 112x112 cap, off-grid, oversized, below minimum
STEPS = 3
ARGS = {**COMMON, "beta": 0.1, "max_steps": STEPS, "num_generations": 2, "per_device_train_batch_size": 4}
ARMS = {
    "grpo": (GRPOTrainer, GRPOConfig, {}),
    "cppo": (CPPOTrainer, CPPOConfig, {"cpl_weight": 0.0}),
    "papo": (PAPOTrainer, PAPOConfig, {"perception_loss_weight": 0.0, "der_loss_weight1": 0.0}),
}


def _dataset() -> Dataset:
    content = [{"type": "image"}, {"type": "text", "text": "What colour is the top left block?"}]
    images = [textured_image(i, 112).resize(size) for i, size in enumerate(SIZES)]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": content}], "images": [im]} for im in images])


def _run(arm: str, model, tmp_path):
    trainer_cls, config_cls, extra = ARMS[arm]
    trainer = trainer_cls(
        model=str(model),
        reward_funcs=hashed_reward,
        args=config_cls(output_dir=str(tmp_path / arm), **ARGS, **extra),
        train_dataset=_dataset(),
        processing_class=load_processor(str(model), min_pixels=784, max_pixels=12544),
    )
    sampled, grids = [], []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate(inputs)
        sampled.append(output["completion_ids"].clone())
        grids.append(output["image_grid_thw"].clone())
        return output

    trainer._generate_and_score_completions = recording
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    return sampled, grids, losses, kl, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def grpo_run(tiny_vlm, tmp_path_factory):
    return _run("grpo", tiny_vlm("qwen2_5_vl"), tmp_path_factory.mktemp("grpo"))


@pytest.mark.parametrize("arm", ["cppo", "papo"])
def test_zero_weight_is_trl_grpo_step_by_step(arm, grpo_run, tiny_vlm, tmp_path):
    sampled, grids, losses, kl, weights = _run(arm, tiny_vlm("qwen2_5_vl"), tmp_path)
    grpo_sampled, grpo_grids, grpo_losses, grpo_kl, grpo_weights = grpo_run
    assert len(sampled) == len(grpo_sampled) == STEPS and len(losses) == STEPS
    for step in range(STEPS):
        assert torch.equal(grids[step], grpo_grids[step]), step  # the processor's own grid, off-grid images too
        assert torch.equal(sampled[step], grpo_sampled[step]), step  # the same sampled ids
    assert losses == grpo_losses and kl == grpo_kl and max(kl) > 0  # β > 0: the reference pass is compared too
    assert all(torch.equal(weights[n], grpo_weights[n]) for n in grpo_weights)


def test_the_processor_alone_resizes(grpo_run):
    """Every grid TRL used is the processor's own for a raw dataset size (3000x2000 down to the 112x112 cap, 45x20 up
    to its minimum): nothing resized the images before it."""
    budget = PixelBudget(factor=28, min_pixels=784, max_pixels=12544)
    expected = {(1, 2 * rows, 2 * columns) for columns, rows in (budget.token_grid(*size) for size in SIZES)}
    seen = {tuple(row) for step in grpo_run[1] for row in step.tolist()}
    assert seen <= expected and len(seen) >= 2
