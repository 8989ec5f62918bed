"""Offline tiny VLMs: every family builds, reloads, runs TRL's processing path, generates and trains one GRPO step."""

import logging
import time

import pytest
import torch
from PIL import Image

from cppo_trl.testing import TINY_VLM_FAMILIES, build_tiny_vlm


logger = logging.getLogger(__name__)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def _image(name: str, size: int = 112) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[name])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Builds every family once per module; building is cheap but reloading per test is not needed."""
    root = tmp_path_factory.mktemp("tiny_vlms")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_vlm(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_dirs(family)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            processor = AutoProcessor.from_pretrained(path)
            cache[family] = (path, model, processor)
        return cache[family]

    return get


def _image_token_count(model, input_ids) -> int:
    return int((input_ids == model.config.image_token_id).sum())


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_reload_forward_generate(family, loaded):
    path, model, processor = loaded(family)
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert processor.chat_template and tokenizer.chat_template
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab >= len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000

    # Chat-template path (what GRPOTrainer._tokenize_prompts does for generation).
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image("red")}, {"type": "text", "text": "What colour?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    n_image_tokens = _image_token_count(model, inputs["input_ids"])
    assert 0 < n_image_tokens <= 128
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == vocab
    assert torch.isfinite(logits).all()

    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # Text + images path (what GRPOTrainer._generate_and_score_completions does for the forward pass).
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    prompts = [prepare_multimodal_messages(PROMPT, images=[_image(c)]) for c in ("green", "blue")]
    texts = [apply_chat_template({"prompt": p}, processor)["prompt"] for p in prompts]
    batch = processor(images=[[_image("green")], [_image("blue")]], text=texts, padding=True, return_tensors="pt")
    assert _image_token_count(model, batch["input_ids"]) == 2 * n_image_tokens
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    logger.info("%s: %d image tokens per 112-px image", family, n_image_tokens)


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_grpo_step_updates_parameters(family, tiny_dirs, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    path = tiny_dirs(family)
    names = ["red", "green", "blue", "yellow"]
    dataset = Dataset.from_dict({"prompt": [PROMPT] * len(names), "images": [[_image(n)] for n in names]})

    def length_reward(completions, **kwargs):
        # A random policy scores 0 on exact-answer rewards; length has variance so advantages are non-zero.
        return [float(len(str(c))) for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        max_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        beta=0.0,
        learning_rate=1e-2,
        save_strategy="no",
    )
    trainer = GRPOTrainer(model=str(path), reward_funcs=length_reward, args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    start = time.perf_counter()
    trainer.train()
    logger.info("%s: one GRPO step in %.2fs", family, time.perf_counter() - start)
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert changed, "no trainable parameter changed after one GRPO step"


def test_build_reuses_and_overwrites(tmp_path):
    path = build_tiny_vlm("qwen2_5_vl", tmp_path / "m")
    model_file = path / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns

    start = time.perf_counter()
    again = build_tiny_vlm("qwen2_5_vl", tmp_path / "m")
    assert again == path
    assert time.perf_counter() - start < 0.5
    assert model_file.stat().st_mtime_ns == mtime

    rebuilt = build_tiny_vlm("qwen2_5_vl", tmp_path / "m", overwrite=True)
    assert rebuilt == path
    assert (path / "model.safetensors").stat().st_mtime_ns != mtime

    # Different arguments rebuild in place (the marker no longer matches).
    other = build_tiny_vlm("qwen2_5_vl", tmp_path / "m", seed=1)
    assert other == path
    assert '"seed": 1' in (path / "cppo_tiny_vlm.json").read_text()


def test_build_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "not_a_model"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_vlm("qwen2_5_vl", foreign)
    assert (foreign / "notes.txt").exists()


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny VLM family"):
        build_tiny_vlm("not_a_family")
