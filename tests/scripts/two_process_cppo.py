"""A few CPPO steps under `accelerate launch --num_processes 2` (CPU, gloo); writes `rank{N}.json` into OUTPUT_DIR with
the `cppo/*` values of every log and a hash of the views this rank built for each prompt key.

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

from cppo_trl import CPPOConfig, CPPOTrainer  # noqa: E402


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
    make_view_images = trainer._make_view_images

    def recording(raw_images, images, key):
        views = make_view_images(raw_images, images, key)
        digest = hashlib.sha256()
        for which in sorted(views.images):
            for image in views.images[which]:
                digest.update(image.tobytes())
        view_hashes.setdefault(f"{trainer.state.global_step}:{key.hex()}", []).append(digest.hexdigest())
        return views

    trainer._make_view_images = recording
    trainer.train()
    logs = [{k: v for k, v in h.items() if k.startswith("cppo/") or k == "step"} for h in trainer.state.log_history]
    result = {
        "rank": trainer.accelerator.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "logs": [h for h in logs if len(h) > 1],
        "view_hashes": view_hashes,
    }
    path = Path(output_dir) / f"rank{trainer.accelerator.process_index}.json"
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
