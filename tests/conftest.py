"""Shared fixtures: one tiny offline Qwen2.5-VL per session, a small image dataset and a reward with variance."""

import hashlib

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer
from cppo_trl.testing import build_tiny_vlm


# Tiny models are overhead-bound: one thread is faster than two, and ~10x faster when other processes load the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Builds each tiny family once per session (~0.5 s each) and returns its folder: `tiny_vlm("gemma3")`."""
    root = tmp_path_factory.mktemp("models")
    return lambda family: build_tiny_vlm(family, root / family)


@pytest.fixture(scope="session")
def tiny_qwen(tiny_vlm):
    return tiny_vlm("qwen2_5_vl")


def textured_image(seed: int, size: int = 112) -> Image.Image:
    """Random blocks: unlike a flat colour, a zoom crop or an occlusion really changes it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((size // 8, size // 8, 1), dtype=np.uint8)))


def make_dataset(num_rows: int = 8, with_text_only_row: bool = False) -> Dataset:
    rows = []
    for i in range(num_rows):
        content = [{"type": "image"}, {"type": "text", "text": "What colour is the top left block?"}]
        rows.append({"prompt": [{"role": "user", "content": content}], "images": [textured_image(i)]})
    if with_text_only_row:
        rows[-1] = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], "images": []}
    return Dataset.from_list(rows)


def hashed_reward(completions, **kwargs):
    """Deterministic reward with variance inside every group, so advantages (and CPL) are live from step one."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [int(hashlib.md5(t.encode()).hexdigest(), 16) % 5 / 4 for t in texts]


@pytest.fixture
def dataset():
    return make_dataset()


COMMON = {
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 10,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "use_cpu": True,
    "logging_steps": 1,
    "learning_rate": 1e-2,
    "save_strategy": "no",
    "seed": 0,
}


def make_trainer(model_path, tmp_path, trainer_cls=CPPOTrainer, dataset=None, eval_dataset=None, **overrides):
    config_cls = {CPPOTrainer: CPPOConfig, PAPOTrainer: PAPOConfig}.get(trainer_cls, GRPOConfig)
    kwargs = {**COMMON, "beta": 0.0, "max_steps": 2, **overrides}
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **kwargs)
    trainer = trainer_cls(
        model=str(model_path),
        reward_funcs=hashed_reward,
        args=args,
        train_dataset=dataset if dataset is not None else make_dataset(),
        eval_dataset=eval_dataset,
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by `train()` in TRL
    return trainer


def generation_batch(trainer, num_rows=4):
    """One scored generation batch (what `_prepare_inputs` buffers), from the trainer's own pipeline."""
    trainer.model.train()
    rows = [trainer.train_dataset[i // trainer.num_generations] for i in range(num_rows)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(rows)


def rollout_of(row, tool_images=()):
    """The `RolloutImages` TRL's rails record for a dataset row (no environment), plus optional tool images."""
    from trl.data_utils import prepare_multimodal_messages

    from cppo_trl.trainer.views import RolloutImages

    images = list(row["images"])
    prompt = prepare_multimodal_messages(row["prompt"], images=images)
    sources = ("dataset",) * len(images) + ("tool",) * len(tool_images)
    return RolloutImages(images=(*images, *tool_images), sources=sources, prompt=prompt)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def count_policy_passes(monkeypatch):
    """Counts GRPOTrainer forward passes and the rows each one scores."""
    rows_per_call = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def counting(self, model, input_ids, *args, **kwargs):
        rows_per_call.append(input_ids.size(0))
        return original(self, model, input_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", counting)
    return rows_per_call
