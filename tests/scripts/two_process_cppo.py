"""A few CPPO steps, then a few PAPO steps, under `accelerate launch --num_processes 2` (CPU, gloo); writes
`rank{N}.json` into OUTPUT_DIR with the `cppo/*` and `papo/*` values of every log and a hash of the views (CPPO) and
masked images (PAPO) this rank built for each prompt key. In the PAPO run one rank's prompts have no image, so it runs
no masked pass: the metric collectives must still line up.

Usage: accelerate launch --cpu --num_processes 2 ... tests/scripts/two_process_cppo.py MODEL_DIR OUTPUT_DIR
"""

import hashlib
import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers in conftest.py

from conftest import hashed_reward, textured_image  # noqa: E402
from datasets import Dataset  # noqa: E402

from cppo_trl import CPPOConfig, CPPOTrainer, PAPOConfig, PAPOTrainer  # noqa: E402


def _hashing(make, trainer, hashes: dict[str, list[str]]):
    """Wraps a view maker to record a hash of the images it draws, per (step, prompt key)."""

    def recording(rollout, key):
        views = make(rollout, key)
        digest = hashlib.sha256()
        for which in sorted(views.images):
            for image in views.images[which]:
                digest.update(image.tobytes())
        hashes.setdefault(f"{trainer.state.global_step}:{key.hex()}", []).append(digest.hexdigest())
        return views

    return recording


def _logs(trainer, prefix: str) -> list[dict]:
    logs = [{k: v for k, v in h.items() if k.startswith(prefix) or k == "step"} for h in trainer.state.log_history]
    return [h for h in logs if len(h) > 1]


def train_papo(model_dir: str, output_dir: str) -> dict:
    """Prompts alternate image / text only, in order: each step, rank 0 gets an image prompt, rank 1 a text-only one."""
    content = [{"type": "image"}, {"type": "text", "text": "What colour is the top left block?"}]
    image_row = {"prompt": [{"role": "user", "content": content}], "images": [textured_image(0)]}
    text_row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], "images": []}
    args = PAPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,  # two prompts per step, one per rank
        shuffle_dataset=False,
        log_multimodal=True,  # TRL 1.16 alone deadlocks here (a text-only rank skips its image gather); the rails fix it
        max_completion_length=8,
        max_steps=2,
        beta=0.0,
        perception_loss_weight=1.0,
        der_loss_weight1=0.1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    dataset = Dataset.from_list([image_row, text_row] * 4)
    trainer = PAPOTrainer(model=model_dir, reward_funcs=hashed_reward, args=args, train_dataset=dataset)
    hashes: dict[str, list[str]] = {}
    trainer._make_masked_images = _hashing(trainer._make_masked_images, trainer, hashes)
    trainer.train()
    logged = {"images": [len(images) for images in trainer._logs["images"]], "prompts": len(trainer._logs["prompt"])}
    return {"logs": _logs(trainer, "papo/"), "mask_hashes": hashes, "logged": logged}


def main(model_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    content = [{"type": "image"}, {"type": "text", "text": "What colour is the top left block?"}]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": content}], "images": [textured_image(0)]}] * 8
    )
    args = CPPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=4,  # one prompt per step, two rollouts on each rank
        max_completion_length=8,
        max_steps=2,
        beta=0.0,
        advantage_gating=False,
        cpl_weight=1.0,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = CPPOTrainer(model=model_dir, reward_funcs=hashed_reward, args=args, train_dataset=dataset)
    view_hashes: dict[str, list[str]] = {}
    trainer._make_view_images = _hashing(trainer._make_view_images, trainer, view_hashes)
    trainer.train()
    result = {
        "rank": trainer.accelerator.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "logs": _logs(trainer, "cppo/"),
        "view_hashes": view_hashes,
        "papo": train_papo(model_dir, str(Path(output_dir) / "papo")),
    }
    path = Path(output_dir) / f"rank{trainer.accelerator.process_index}.json"
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
