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
LONG_TEXT = "What colour is the shape in the picture? Answer with one word."
VISION_MARKERS = ("visual", "vision")


def _image(name: str, size: tuple[int, int] = (112, 112)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[name])


def _prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def loaded(tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_vlm(family)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            cache[family] = (model, AutoProcessor.from_pretrained(path))
        return cache[family]

    return get


def _trl_batch(processor, texts, images):
    """Builds model inputs exactly as GRPOTrainer does for its forward pass: rendered text + nested image lists."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    prompts = [prepare_multimodal_messages(_prompt(t), images=[im]) for t, im in zip(texts, images, strict=True)]
    rendered = [apply_chat_template({"prompt": p}, processor)["prompt"] for p in prompts]
    return processor(images=[[im] for im in images], text=rendered, padding=True, return_tensors="pt")


def _last_logits(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    return logits[:, -1]


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_reload_forward_generate(family, loaded):
    model, processor = loaded(family)
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert processor.chat_template and tokenizer.chat_template
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab >= len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    text = "Let me think: <think> 3 + 4 = 7 </think> \\boxed{7} The RED circle is above."
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    # Chat-template path (what GRPOTrainer._tokenize_prompts does before generating).
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image("red")}, {"type": "text", "text": "What colour?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 0 < n_image_tokens <= 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == vocab
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # Text + images path (what GRPOTrainer._generate_and_score_completions does for the forward pass).
    red = _last_logits(model, _trl_batch(processor, ["What colour?"], [_image("red")]))
    blue = _last_logits(model, _trl_batch(processor, [LONG_TEXT], [_image("blue")]))
    blue_short = _last_logits(model, _trl_batch(processor, ["What colour?"], [_image("blue")]))
    assert not torch.allclose(red, blue_short, atol=1e-5), "the image does not reach the logits"

    # Left padding must not change a prompt's logits (misaligned image/token-type ids would).
    batch = _trl_batch(processor, ["What colour?", LONG_TEXT], [_image("red"), _image("blue")])
    both = _last_logits(model, batch)
    torch.testing.assert_close(both[0], red[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], blue[0], atol=1e-4, rtol=1e-4)

    # Other sizes and aspect ratios are resized, never blow up the token budget.
    for size in [(200, 150), (64, 64), (90, 300), (448, 448)]:
        batch = _trl_batch(processor, ["What colour?"], [_image("green", size)])
        assert 0 < int((batch["input_ids"] == model.config.image_token_id).sum()) <= 64
        _last_logits(model, batch)
    logger.info("%s: %d image tokens per 112-px image", family, n_image_tokens)


def _grpo_dataset():
    from datasets import Dataset

    names = list(COLOURS)
    return Dataset.from_dict({"prompt": [PROMPT] * len(names), "images": [[_image(n)] for n in names]})


def _length_reward(completions, **kwargs):
    # A random policy scores 0 on exact-answer rewards; length has variance, so advantages are non-zero.
    return [float(len(str(c))) for c in completions]


def _grpo_args(output_dir, **overrides):
    from trl import GRPOConfig

    kwargs = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 8,
        "max_steps": 1,
        "bf16": False,
        # TRL defaults to checkpointing on. `gradient_checkpointing` is the name every transformers 5 release knows
        # (5.17, which the [gpu] extra installs, has no `activation_checkpointing`; later releases warn on the old name).
        "gradient_checkpointing": False,
        "report_to": "none",
        "use_cpu": True,
        "logging_steps": 1,
        "beta": 0.0,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _train_one_step(path, args):
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=str(path), reward_funcs=_length_reward, args=args, train_dataset=_grpo_dataset())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    return trainer, changed, elapsed


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_grpo_step_updates_parameters(family, tiny_vlm, tmp_path):
    trainer, changed, elapsed = _train_one_step(tiny_vlm(family), _grpo_args(tmp_path))
    logger.info("%s: trainer.train() for one GRPO step took %.2fs", family, elapsed)
    assert changed, "no trainable parameter changed after one GRPO step"
    # The vision tower must be in the graph: a blind model would make perception-based rewards meaningless.
    assert any(marker in n for n in changed for marker in VISION_MARKERS), "vision tower received no update"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_grpo_step_with_trl_defaults(family, tiny_vlm, tmp_path):
    """TRL's default activation checkpointing plus a KL term, which reloads the reference model from the folder."""
    args = _grpo_args(tmp_path, gradient_checkpointing=True, beta=0.04)
    trainer, changed, _ = _train_one_step(tiny_vlm(family), args)
    assert trainer.args.gradient_checkpointing
    assert trainer.ref_model is not None
    assert changed


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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folders were left behind"


def test_build_is_deterministic(tmp_path):
    a = build_tiny_vlm("qwen2_5_vl", tmp_path / "a")
    b = build_tiny_vlm("qwen2_5_vl", tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_default_cache_dir(tmp_path, monkeypatch):
    from cppo_trl.testing import default_cache_dir

    monkeypatch.setenv("CPPO_TRL_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    path = build_tiny_vlm("qwen2_5_vl", image_size=56)
    assert path.parent == tmp_path / "cache"
    monkeypatch.delenv("CPPO_TRL_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "cppo_trl", "tiny_models")


def test_build_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "not_a_model"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_vlm("qwen2_5_vl", foreign)
    assert (foreign / "notes.txt").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown tiny VLM family"):
        build_tiny_vlm("not_a_family")
    with pytest.raises(ValueError, match="image_size"):
        build_tiny_vlm("qwen2_5_vl", image_size=100)
