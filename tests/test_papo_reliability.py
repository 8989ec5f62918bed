"""PAPOTrainer across model families and bad input, the matrix CPPO is held to: every tiny_vlm family trains with the
masked pass, multi-image prompts (each image masked), odd image modes and sizes, EOS-only completions, and a resumed
run that rebuilds the same masks and losses."""

import io

import numpy as np
import pytest
import torch
from conftest import generation_batch, loss_and_grads, make_trainer, textured_image
from datasets import Dataset
from PIL import Image
from trl import GRPOTrainer

from cppo_trl import PAPOTrainer
from cppo_trl.testing import TINY_VLM_FAMILIES
from cppo_trl.trainer.papo_trainer import HAS_MASKED_VIEW_KEY, MASKED, MASKED_LOGPS_KEY


def _papo(model, tmp_path, **overrides):
    return make_trainer(model, tmp_path, trainer_cls=PAPOTrainer, **{"perception_loss_weight": 1.0, **overrides})


def _prompt(text: str, num_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _assert_masked_pass_on_every_image_row(inputs):
    loss_tokens = inputs["completion_mask"].bool() & inputs[HAS_MASKED_VIEW_KEY].unsqueeze(1)
    assert torch.isfinite(inputs[MASKED_LOGPS_KEY][loss_tokens]).all()
    assert not inputs[MASKED_LOGPS_KEY].requires_grad


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_every_family_trains_with_papo(tiny_vlm, tmp_path, family):
    trainer = _papo(tiny_vlm(family), tmp_path, der_loss_weight1=0.1, max_steps=2)
    inputs = generation_batch(trainer)
    assert inputs[HAS_MASKED_VIEW_KEY].all()
    _assert_masked_pass_on_every_image_row(inputs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "papo/kl_prc" in h]
    assert len(logs) == 2
    assert all(np.isfinite(h["papo/kl_prc"]) and np.isfinite(h["loss"]) for h in logs)
    assert all(h["papo/nonfinite_masked_tokens"] == 0 and h["papo/masked_view_rows"] == 4 for h in logs)
    assert any(h["papo/kl_prc"] > 0 for h in logs)
    assert all(0.3 < h["papo/masked_fraction"] < 0.9 for h in logs)  # 64 cells per 112 px image: 0.6 ± 0.25
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    # As for CPPO: the few never-updated parameters are vision-tower tails unused by the feature layer (llava) or
    # gemma3's unused embedding rows.
    assert len(changed) / len(before) > 0.8


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3", "llava_next"])
def test_mixed_image_counts_each_image_masked(tiny_vlm, tmp_path, monkeypatch, family):
    """Prompts with 2, 1 and 0 images in one generation batch: every image gets its own mask, the text-only prompt
    no masked pass, and the loss stays finite."""
    dataset = Dataset.from_list(
        [
            {"prompt": _prompt("What colour is the top left block?", 2), "images": [textured_image(1)] * 2},
            {"prompt": _prompt("How many circles are there?", 1), "images": [textured_image(3)]},
            {"prompt": _prompt("Is the square red?", 0), "images": []},
        ]
    )
    trainer = _papo(
        tiny_vlm(family), tmp_path, dataset=dataset, num_generations=2, per_device_train_batch_size=6, max_steps=1
    )
    drawn = []
    original = PAPOTrainer._make_masked_images

    def recording(self, rollout, key):
        out = original(self, rollout, key)
        drawn.append([np.asarray(image) for image in out.images[MASKED]])
        return out

    monkeypatch.setattr(PAPOTrainer, "_make_masked_images", recording)
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([dataset[i // 2] for i in range(6)])
    assert inputs[HAS_MASKED_VIEW_KEY].tolist() == [True, True, True, True, False, False]
    assert [len(images) for images in drawn] == [2, 1]
    assert not np.array_equal(drawn[0][0], drawn[0][1])  # the same picture twice, two masks
    _assert_masked_pass_on_every_image_row(inputs)
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["papo/masked_view_rows"][-1] == 4


def _exif_rotated() -> Image.Image:
    image = textured_image(7).crop((0, 0, 112, 56))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    return Image.open(buffer)


def test_odd_image_modes_and_sizes_are_masked_and_train(tiny_vlm, tmp_path):
    rng = np.random.default_rng(0)
    base = textured_image(3)
    images = {
        "RGBA": base.convert("RGBA"),
        "P": base.convert("P"),
        "1": base.convert("1"),
        "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (112, 112), dtype=np.uint16)),
        "1x1": Image.new("RGB", (1, 1), (200, 10, 10)),
        "3000x2000": Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)),
        "exif": _exif_rotated(),
    }
    trainer = _papo(tiny_vlm("qwen2_5_vl"), tmp_path, num_generations=2, per_device_train_batch_size=2 * len(images))
    rows = [{"prompt": _prompt("What colour?", 1), "images": [im]} for im in images.values() for _ in range(2)]
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    assert inputs[HAS_MASKED_VIEW_KEY].all()
    _assert_masked_pass_on_every_image_row(inputs)
    # 3000x2000 raw pixels are masked at 14 px (215 x 143 cells), then fitted to the budget.
    assert inputs["papo_total_cells"].item() >= 215 * 143
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["papo/nonfinite_masked_tokens"][-1] == 0


def test_eos_only_completions_are_finite(tiny_vlm, tmp_path, monkeypatch):
    trainer = _papo(tiny_vlm("qwen2_5_vl"), tmp_path, der_loss_weight1=0.1)

    def eos_only(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [[self.eos_token_ids[0]] for _ in prompt_ids], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", eos_only)
    inputs = generation_batch(trainer)
    assert inputs["completion_ids"].shape == (4, 1)
    _assert_masked_pass_on_every_image_row(inputs)
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_resume_rebuilds_the_masks_and_the_next_step_loss(tiny_vlm, tmp_path):
    common = {"der_loss_weight1": 0.1, "save_strategy": "steps", "save_steps": 2, "max_steps": 3}
    full = _papo(tiny_vlm("qwen2_5_vl"), tmp_path / "full", **common)
    full.train()
    reference = [h for h in full.state.log_history if "loss" in h]
    checkpoint = tmp_path / "full" / "PAPOTrainer" / "checkpoint-2"
    resumed = _papo(tiny_vlm("qwen2_5_vl"), tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    step3 = [h for h in resumed.state.log_history if "loss" in h and h["step"] == 3]
    assert len(step3) == 1 and reference[2]["step"] == 3
    for key in ("loss", "papo/kl_prc", "papo/masked_logp", "papo/masked_fraction"):
        assert step3[0][key] == pytest.approx(reference[2][key], abs=1e-5), key
