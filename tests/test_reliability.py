"""CPPOTrainer across model families and bad input: every tiny_vlm family trains with CPL, multi-image prompts, odd image
modes and sizes, degenerate completions, placeholder tokens in completions, resume and determinism, bf16 numerics."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from conftest import count_policy_passes, generation_batch, hashed_reward, loss_and_grads, make_trainer, textured_image
from datasets import Dataset
from PIL import Image
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template, prepare_multimodal_messages

from cppo_trl import CPPOConfig, CPPOTrainer
from cppo_trl.core.perturbations import make_views_for_sample, sample_key, to_rgb
from cppo_trl.testing import TINY_VLM_FAMILIES
from cppo_trl.trainer.cppo_trainer import VIEWS_KEY
from cppo_trl.trainer.views import VISION_KEYS, stack_padded


def _prompt(text: str, num_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _rows(images_per_row: list[list[Image.Image]]) -> Dataset:
    texts = ["What colour is the top left block?", "How many circles are there?", "Is the square red?"]
    return Dataset.from_list(
        [{"prompt": _prompt(texts[i % 3], len(imgs)), "images": imgs} for i, imgs in enumerate(images_per_row)]
    )


def _changed_fraction(trainer, before) -> float:
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    return len(changed) / len(before)


def _assert_views_match_layout(inputs):
    """Every row has views, and the views stacked like `_view_pass` does have the original tensors' exact layout."""
    views = inputs[VIEWS_KEY]
    assert all(v is not None for v in views)
    for which in ("preserved", "removed"):
        expected = {k for k in VISION_KEYS if inputs.get(k) is not None}
        assert set(views[0].tensors[which]) == expected, which
        for k in expected:
            stacked = stack_padded([v.tensors[which][k] for v in views])
            assert stacked.shape == inputs[k].shape, (which, k)
            assert stacked.dtype == inputs[k].dtype, (which, k)
            if not k.startswith("pixel_values"):  # grid sizes, attention masks, image sizes: identical to the original
                assert torch.equal(stacked, inputs[k].cpu()), (which, k)


# ------------------------------------------------------------------ 1. every family
FAMILY_CASES = [(f, "k3") for f in TINY_VLM_FAMILIES] + [(f, "full") for f in TINY_VLM_FAMILIES]


@pytest.mark.parametrize(("family", "divergence"), FAMILY_CASES)
def test_every_family_trains_with_cpl(tiny_vlm, tmp_path, family, divergence):
    trainer = make_trainer(
        tiny_vlm(family), tmp_path, advantage_gating=False, cpl_divergence=divergence, cpl_weight=1.0, max_steps=2
    )
    _assert_views_match_layout(generation_batch(trainer))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "cppo/cpl_loss" in h]
    assert len(logs) == 2
    assert all(h["cppo/extra_pass_rows"] > 0 for h in logs)
    assert all(np.isfinite(h["cppo/cpl_loss"]) and np.isfinite(h["loss"]) for h in logs)
    assert all(h["cppo/nonfinite_skipped"] == 0 for h in logs)
    assert any(h["cppo/cpl_loss"] > 0 for h in logs)
    # The few parameters that never get a gradient are vision-tower tails unused by the feature layer (llava) or
    # gemma3's unused embedding rows; everything else moves.
    assert _changed_fraction(trainer, before) > 0.8


def test_view_changing_size_raises_clear_error(tiny_vlm, tmp_path, monkeypatch):
    """A 224x56 view has the 112x112 image's token count under Qwen but another grid: refused, never misaligned."""
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, advantage_gating=False)
    original = make_views_for_sample

    def resized(images, *args, **kwargs):
        views = original(images, *args, **kwargs)
        return [dataclasses.replace(v, preserved=v.preserved.resize((224, 56))) for v in views]

    monkeypatch.setattr("cppo_trl.trainer.cppo_trainer.make_views_for_sample", resized)
    with pytest.raises(ValueError, match=r"preserved view is 224x56 but the image is 112x112"):
        generation_batch(trainer)


class _TokenChangingProcessor:
    """The real processor, except that it emits one more prompt token for images tagged as perturbed views."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, images=None, **kwargs):
        encoded = self._processor(*args, images=images, **kwargs)
        if images and any(im.info.get("view") for batch in images for im in batch):
            encoded["input_ids"] = torch.cat([encoded["input_ids"], encoded["input_ids"][:, -1:]], dim=1)
        return encoded


def test_processor_changing_token_count_under_a_view_raises_clear_error(tiny_vlm, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, advantage_gating=False)
    original = make_views_for_sample

    def tagged(images, *args, **kwargs):
        views = original(images, *args, **kwargs)
        for v in views:
            v.preserved.info["view"] = v.removed.info["view"] = True
        return views

    monkeypatch.setattr("cppo_trl.trainer.cppo_trainer.make_views_for_sample", tagged)
    trainer.processing_class = _TokenChangingProcessor(trainer.processing_class)
    with pytest.raises(ValueError, match=r"prompt tokens for the preserved view but \d+ for the original images"):
        generation_batch(trainer)


# ------------------------------------------------------------------ 2. multi-image prompts
@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3", "llava_next"])
def test_mixed_image_counts_train(tiny_vlm, tmp_path, family):
    """Prompts with 2, 1 and 0 images in one generation batch: views per image, CPL on image rows, no crash."""
    dataset = _rows([[textured_image(1), textured_image(2)], [textured_image(3)], []])
    trainer = make_trainer(
        tiny_vlm(family),
        tmp_path,
        dataset=dataset,
        advantage_gating=False,
        cpl_weight=1.0,
        num_generations=2,
        per_device_train_batch_size=6,
        max_steps=1,
    )
    rows = [dataset[i // 2] for i in range(6)]
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    views = inputs[VIEWS_KEY]
    assert views[4] is None and views[5] is None  # the text-only prompt
    assert len(views[0].transforms) == 2 and len(views[2].transforms) == 1
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 4
    trainer.train()
    assert np.isfinite(trainer.state.log_history[0]["loss"])


def test_each_image_of_a_prompt_gets_its_own_views(tiny_vlm, tmp_path):
    """Two identical images in one prompt still get different views: each image has its own seed."""
    image = textured_image(5)
    dataset = _rows([[image, image.copy()]])
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, dataset=dataset, advantage_gating=False)
    inputs = generation_batch(trainer)
    view = inputs[VIEWS_KEY][0]
    for which in ("preserved", "removed"):
        pixels = view.tensors[which]["pixel_values"]
        first, second = pixels.chunk(2)  # both images have the same grid
        assert not torch.equal(first, second), which
        assert view.tensors[which]["image_grid_thw"].shape[0] == 2


def test_views_follow_their_rows_through_shuffle_and_split(tiny_vlm, tmp_path, monkeypatch):
    """With steps_per_generation > 1 TRL shuffles and splits the generation batch; every row that reaches the loss
    must carry the views rebuilt from its own prompt's images."""
    texts = ["Is the square red?", "How many circles are there?", "What colour is the top left block?", "Say yes."]
    dataset = Dataset.from_list(
        [{"prompt": _prompt(t, 1), "images": [textured_image(10 + i)]} for i, t in enumerate(texts)]
    )
    trainer = make_trainer(
        tiny_vlm("qwen2_5_vl"),
        tmp_path,
        dataset=dataset,
        advantage_gating=False,
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=4,
        max_steps=4,
    )
    processor = trainer.processing_class
    by_ids = {}
    for row in dataset:
        images = [to_rgb(im) for im in row["images"]]
        prompt = prepare_multimodal_messages(row["prompt"], images=images)
        text = apply_chat_template({"prompt": prompt}, processor)["prompt"]
        ids = processor(images=[images], text=[text], return_tensors="pt")["input_ids"][0]
        by_ids[tuple(ids.tolist())] = (text, images)
    assert len(by_ids) == 4

    generation_steps, checked = [], []
    original_generate = CPPOTrainer._generate_and_score_completions
    original_loss = CPPOTrainer._compute_loss

    def generate(self, inputs):
        generation_steps.append(self.state.global_step)
        return original_generate(self, inputs)

    def compute_loss(self, model, inputs):
        for i, view in enumerate(inputs[VIEWS_KEY]):
            ids = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()]
            text, images = by_ids[tuple(ids.tolist())]
            key = sample_key(text, images)
            rebuilt = make_views_for_sample(
                images, self._perturbation_params, self.args.seed, generation_steps[-1], key
            )
            for which in ("preserved", "removed"):
                expected = processor(images=[[getattr(v, which) for v in rebuilt]], text=[text], return_tensors="pt")
                assert torch.equal(view.tensors[which]["pixel_values"], expected["pixel_values"]), (text, which)
            checked.append(text)
        return original_loss(self, model, inputs)

    monkeypatch.setattr(CPPOTrainer, "_generate_and_score_completions", generate)
    monkeypatch.setattr(CPPOTrainer, "_compute_loss", compute_loss)
    trainer.train()
    assert len(checked) == 8 and set(checked) == {t for t, _ in by_ids.values()}


# ------------------------------------------------------------------ 3. bad input
def _exif_rotated() -> Image.Image:
    image = textured_image(7, size=112).crop((0, 0, 112, 56))  # landscape on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display": displayed portrait
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    return Image.open(buffer)


def _odd_images() -> dict[str, Image.Image]:
    base = textured_image(3)
    rng = np.random.default_rng(0)
    return {
        "RGBA": base.convert("RGBA"),
        "LA": base.convert("LA"),
        "P": base.convert("P"),
        "1": base.convert("1"),
        "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (112, 112), dtype=np.uint16)),
        "1x1": Image.new("RGB", (1, 1), (200, 10, 10)),
        "3000x2000": Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)),
        "exif": _exif_rotated(),
    }


def test_odd_image_modes_and_sizes_train(tiny_vlm, tmp_path):
    images = _odd_images()
    assert images["I;16"].mode == "I;16" and images["exif"].getexif().get(0x0112) == 6
    dataset = _rows([[im] for im in images.values()])
    trainer = make_trainer(
        tiny_vlm("qwen2_5_vl"),
        tmp_path,
        dataset=dataset,
        advantage_gating=False,
        cpl_weight=1.0,
        num_generations=2,
        per_device_train_batch_size=2 * len(images),
        max_steps=1,
    )
    # Rows straight to the trainer: `datasets` re-encodes images (dropping EXIF and some modes) on the way in.
    rows = [{"prompt": _prompt("What colour?", 1), "images": [im]} for im in images.values() for _ in range(2)]
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    views = inputs[VIEWS_KEY]
    assert all(v is not None for v in views)
    for v in views:
        assert all(torch.isfinite(v.tensors[w]["pixel_values"]).all() for w in ("preserved", "removed"))
    rotated = views[2 * list(images).index("exif")].tensors["preserved"]["image_grid_thw"][0]
    assert rotated[1] > rotated[2]  # EXIF applied: portrait (taller than wide) patch grid
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 2 * len(images)
    assert trainer._metrics["train"]["cppo/nonfinite_skipped"][-1] == 0


def _patch_generation(monkeypatch, make_completion):
    """Replaces the sampled completions (transformers path) by `make_completion(trainer, row_index)`."""

    def fake(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [make_completion(self, i) for i in range(len(prompt_ids))], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake)


def test_eos_only_completions_are_finite(tiny_vlm, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, advantage_gating=False, cpl_weight=1.0)
    _patch_generation(monkeypatch, lambda self, i: [self.eos_token_ids[0]])
    inputs = generation_batch(trainer)
    assert inputs["completion_ids"].shape == (4, 1) and inputs["completion_mask"].sum() == 4
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 4


def test_all_completions_masked_after_truncation(tiny_vlm, tmp_path, monkeypatch):
    """`mask_truncated_completions=True` and every completion hits the length limit: no loss token, no extra pass."""
    trainer = make_trainer(
        tiny_vlm("qwen2_5_vl"), tmp_path, advantage_gating=False, cpl_weight=1.0, mask_truncated_completions=True
    )
    word = trainer.processing_class.tokenizer.convert_tokens_to_ids("the")
    _patch_generation(monkeypatch, lambda self, i: [word] * self.max_completion_length)
    inputs = generation_batch(trainer)
    assert inputs["completion_mask"].sum() == 0
    passes = count_policy_passes(monkeypatch)
    loss, grads = loss_and_grads(trainer, inputs)
    assert passes == [4]  # the policy pass only
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 0
    assert trainer._metrics["train"]["cppo/cpl_loss"][-1] == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_completion_with_image_token_is_truncated_before_it(tiny_vlm, tmp_path, monkeypatch, family):
    trainer = make_trainer(tiny_vlm(family), tmp_path, advantage_gating=False, cpl_weight=1.0)
    image_token = trainer.model.config.image_token_id
    word = trainer.processing_class.tokenizer.convert_tokens_to_ids("the")
    eos = trainer.eos_token_ids[0]
    completions = [
        [word, word, image_token, word, eos],  # cut after two tokens
        [image_token, word, eos],  # cut to nothing: keeps one EOS
        [word, word, word, eos],  # untouched
        [word, image_token, image_token, eos],
    ]
    _patch_generation(monkeypatch, lambda self, i: list(completions[i]))
    inputs = generation_batch(trainer)
    assert not (inputs["completion_ids"] == image_token).any()
    assert inputs["completion_mask"].sum(-1).tolist() == [2, 1, 4, 1]
    assert inputs["completion_ids"][1, 0] == eos
    assert trainer._metrics["train"]["cppo/truncated_at_image_token"][-1] == 3
    loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/extra_pass_rows"][-1] == 4
    trainer.train()  # the full loop too, with the logged count
    assert all(h["cppo/truncated_at_image_token"] == 3 for h in trainer.state.log_history if "loss" in h)


def test_truncated_completion_text_is_redecoded(tiny_vlm, tmp_path, monkeypatch):
    """Rewards see the text of what is trained: the tokens after the placeholder are gone from the completion."""
    seen = []

    def reward(completions, **kwargs):
        seen.extend(c[0]["content"] for c in completions)
        return hashed_reward(completions)

    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path)
    trainer.reward_funcs = [reward]
    tok = trainer.processing_class.tokenizer
    image_token = trainer.model.config.image_token_id
    ids = [tok.encode("red")[0], tok.encode(" blue")[0]]
    _patch_generation(monkeypatch, lambda self, i: [ids[0], image_token, ids[1], self.eos_token_ids[0]])
    generation_batch(trainer)
    assert seen == [tok.decode([ids[0]])] * 4


def test_empty_preserving_set_rejected():
    with pytest.raises(ValueError, match="preserving_perturbations"):
        CPPOConfig(output_dir="/tmp/cppo-config-test", use_cpu=True, report_to="none", preserving_perturbations=[])


# ------------------------------------------------------------------ 4. resume and determinism
def test_same_seed_same_views(tiny_vlm, tmp_path, monkeypatch):
    recorded = {"a": [], "b": []}
    original = CPPOTrainer._build_views
    run = "a"

    def build(self, rollouts, output):
        views = original(self, rollouts, output)
        recorded[run].append([None if v is None else v.tensors["removed"]["pixel_values"].clone() for v in views])
        recorded[run].append([None if v is None else v.tensors["preserved"]["pixel_values"].clone() for v in views])
        return views

    monkeypatch.setattr(CPPOTrainer, "_build_views", build)
    losses = {}
    for run in ("a", "b"):  # noqa: B007 -- `build` reads the loop variable
        trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path / run, advantage_gating=False, max_steps=2)
        trainer.train()
        losses[run] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["a"] == losses["b"]
    assert len(recorded["a"]) == len(recorded["b"]) == 4
    for va, vb in zip(recorded["a"], recorded["b"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


def test_resume_reproduces_next_step_loss(tiny_vlm, tmp_path):
    common = {"advantage_gating": False, "cpl_weight": 1.0, "save_strategy": "steps", "save_steps": 2, "max_steps": 3}
    full = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path / "full", **common)
    full.train()
    reference = [h for h in full.state.log_history if "loss" in h]
    checkpoint = tmp_path / "full" / "CPPOTrainer" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    step3 = [h for h in resumed.state.log_history if "loss" in h]
    step3 = [h for h in step3 if h["step"] == 3]
    assert len(step3) == 1 and reference[2]["step"] == 3
    assert step3[0]["loss"] == pytest.approx(reference[2]["loss"], abs=1e-5)
    assert step3[0]["cppo/cpl_loss"] == pytest.approx(reference[2]["cppo/cpl_loss"], abs=1e-5)


# ------------------------------------------------------------------ 6. numerics
def test_bf16_autocast_keeps_cpl_finite(tiny_vlm, tmp_path):
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, advantage_gating=False, cpl_weight=1.0)
    inputs = generation_batch(trainer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(trainer, inputs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["cppo/nonfinite_skipped"][-1] == 0
    assert np.isfinite(trainer._metrics["train"]["cppo/cpl_loss"][-1])


@pytest.mark.parametrize("autocast", [False, True])
def test_extreme_logits_through_projection_stay_finite(tiny_vlm, tmp_path, autocast):
    """Hidden states that give logits of ±1e4 through the trainer's own head transform and full-vocabulary KL."""
    trainer = make_trainer(tiny_vlm("qwen2_5_vl"), tmp_path, cpl_divergence="full")
    head = trainer.model.get_output_embeddings()
    vocab, width = head.weight.shape
    weight = torch.zeros(vocab, width)
    weight[: min(vocab, width), : min(vocab, width)] = torch.eye(min(vocab, width))
    weight.requires_grad_(True)
    hidden = []
    for sign in (1.0, -1.0, 1.0):
        h = torch.zeros(3, width)
        h[:, :3] = sign * 1e4 * torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.0, 1.0, -1.0]])
        hidden.append(h.requires_grad_(True))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, d_pos, d_neg = trainer._chunk_cpl(weight, None, *hidden)
        logits = trainer._project(hidden[0], weight, None)
    assert logits.dtype == torch.float32 and logits.abs().max() >= 1e4
    assert torch.isfinite(loss).all() and torch.isfinite(d_pos).all() and torch.isfinite(d_neg).all()
    assert (d_pos >= 0).all() and (d_neg >= 0).all()
    loss.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (weight, *hidden))
