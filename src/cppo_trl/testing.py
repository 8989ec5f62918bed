"""Tiny random vision-language models for offline tests.

The test machines cannot reach the Hugging Face Hub, so every weight, tokenizer and processor is built locally: a
small byte-level BPE tokenizer trained on an in-code corpus, the family's real processor class, TRL's shipped chat
template, and a model config shrunk to a few hundred thousand parameters. The result is saved to a folder because
TRL reloads the reference model from ``config._name_or_path``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_SIZES",
    "TINY_VLM_FAMILIES",
    "build_local_tokenizer",
    "build_tiny_vlm",
    "default_cache_dir",
    "load_trl_chat_template",
    "tiny_corpus",
]

# Bump when the construction changes so that stale cached folders are rebuilt instead of reused.
_BUILD_VERSION = 2
_MARKER_FILE = "cppo_tiny_vlm.json"

# Reasoning markers are ordinary (non-special) added tokens: atomic, but kept by ``skip_special_tokens=True`` so
# format rewards can see them in decoded completions.
_REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


def default_cache_dir() -> Path:
    """Returns where tiny models are cached: ``$CPPO_TRL_CACHE`` or ``~/.cache/cppo_trl/tiny_models``."""
    env = os.environ.get("CPPO_TRL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cppo_trl" / "tiny_models"


def load_trl_chat_template(name: str) -> str:
    """Reads one of the chat templates shipped inside the installed ``trl`` package (``trl/chat_templates``)."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


def tiny_corpus() -> list[str]:
    """Returns the in-code training corpus; covers the words, digits and markup that CPPO prompts and rewards use."""
    words = (
        "the a an is are was of to in on at and or not what which how many much colour color shape image picture "
        "question answer think reason step first then so therefore because final object left right top bottom "
        "center middle above below next count number total sum difference more less than equal bigger smaller "
        "yes no true false option choose select correct wrong please describe look see there here this that "
        "these those it its one two three four five six seven eight nine ten hundred area length angle degree "
        "triangle square circle rectangle star cross line point dot ellipse polygon hexagon "
        "red green blue yellow orange purple pink brown black white grey gray cyan magenta "
        "user assistant system you are helpful model answer solve problem compute find value"
    ).split()
    lines = [
        " ".join(words),
        " ".join(w.capitalize() for w in words),
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 100 128 256 1000 3.14 0.5 -1",
        "+ - * / = < > <= >= != ( ) [ ] { } ^ _ % , . : ; ! ? ' \" # $ & | ~ @",
        "A B C D E (A) (B) (C) (D) (E) A. B. C. D. E. Answer: A",
        "\\boxed{42} \\boxed{A} \\frac{1}{2} \\sqrt{2} \\times \\cdot \\pi \\alpha \\beta \\theta \\circ $x^2$ $x_1$",
        "<think> Let me think step by step. </think> <answer> 7 </answer>",
        "What colour is the shape? The shape is red. How many circles are there? There are 3 circles.",
        "Is the square above the circle? yes. Is the star blue? no. The answer is \\boxed{B}.",
        "Picture 1: Video 1: Question: Answer: User: Assistant: system user assistant",
    ]
    # Repeat so frequent pairs win the BPE merges; the corpus is tiny either way.
    return lines * 20


def build_local_tokenizer(
    special_tokens: Sequence[str],
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    unk_token: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str | None = None,
    vocab_size: int = 768,
    model_max_length: int = 8192,
):
    """Trains a byte-level BPE tokenizer on :func:`tiny_corpus` and wraps it as ``PreTrainedTokenizerFast``.

    Special tokens take the first ids (in the given order). ``extra_special_tokens`` are named model-specific tokens
    (e.g. ``{"image_token": "<image>"}``) that processors look up as tokenizer attributes. Padding is on the left:
    TRL generates from left-padded prompts and right padding silently misaligns multimodal token-type ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials: list[str] = []
    for tok in [pad_token, eos_token, bos_token, unk_token, *special_tokens, *(extra_special_tokens or {}).values()]:
        if tok is not None and tok not in specials:
            specials.append(tok)

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in _REASONING_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        extra_special_tokens=dict(extra_special_tokens or {}),
        padding_side="left",
        truncation_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How to build one family: its tokens, chat template, processor and (tokenizer-dependent) model config."""

    chat_template: str
    eos_token: str
    pad_token: str
    build_processor: Callable[[Any, str, int], Any]
    build_config: Callable[[Any, int, int | None], Any]
    bos_token: str | None = None
    unk_token: str | None = None
    special_tokens: tuple[str, ...] = ()
    extra_special_tokens: dict[str, str] = field(default_factory=dict)
    # Extra end-of-turn tokens that should also stop generation.
    stop_tokens: tuple[str, ...] = ()


def _ids(tokenizer, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for tok, i in zip(tokens, ids, strict=True):
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"token {tok!r} is missing from the tiny tokenizer")
    return ids


# Shared tiny text-tower sizes: 2 layers, hidden 64, 4 heads of 16 dims.
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
# Shared tiny vision-tower sizes.
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Vision towers use 14-px patches merged/pooled 2x2 (LLaVA: 28-px patches), so an ``image_size`` square gives
# ``(image_size // 28) ** 2`` image tokens; Qwen3-VL keeps 16-px patches on a grid rounded up to 32 px.
_PATCH = 14


def _tokens_per_image(image_size: int) -> int:
    return (image_size // (2 * _PATCH)) ** 2


def _text_config(tokenizer, head_dim: int | None = None, **extra: Any) -> dict[str, Any]:
    """Tiny text config whose vocabulary covers the tokenizer and whose special ids match it.

    ``head_dim`` (default: 16, i.e. hidden 64 / 4 heads) keeps the hidden size and re-splits it into
    ``hidden_size // head_dim`` query heads (half as many key/value heads, at least 1). vLLM's CPU attention needs
    ``head_dim >= 32``: ``head_dim=32`` gives 2 query heads and 1 key/value head, with no new parameters.
    """
    config = dict(_TEXT, vocab_size=len(tokenizer), **_special_ids(tokenizer))
    if head_dim is not None:
        heads = _TEXT["hidden_size"] // head_dim
        config.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim)
    config.update(extra)
    return config


def _head_dim(head_dim: int | None) -> int:
    return head_dim if head_dim is not None else _TEXT["hidden_size"] // _TEXT["num_attention_heads"]


def _mrope_section(head_dim: int | None) -> list[int]:
    """(time, height, width) split of the rotary half-dim, in Qwen's 1:1.5:1.5 ratio; sums to ``head_dim // 2``."""
    half = _head_dim(head_dim) // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]  # head_dim 16 -> [2, 3, 3] (as before), 32 -> [4, 6, 6], 64 -> [8, 12, 12]


def _special_ids(tokenizer) -> dict[str, int | None]:
    bos = tokenizer.bos_token_id
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": bos if bos is not None else tokenizer.pad_token_id,
    }


# --- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ------------------------------------------------------------------------

_QWEN_TOKENS = {
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "special_tokens": (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    "extra_special_tokens": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
    "stop_tokens": ("<|endoftext|>",),
}
# mrope_section splits the rotary half-dim (head_dim / 2 = 8) over (time, height, width); it must sum to 8.
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}


def _qwen_rope(head_dim: int | None, **extra: Any) -> dict[str, Any]:
    return dict(_QWEN_ROPE, mrope_section=_mrope_section(head_dim), **extra)


def _qwen_processor(processor_cls: str, video_cls: str, patch_size: int):
    def build(tokenizer, chat_template: str, image_size: int):
        import transformers

        # Cap images at one ``image_size`` square (rounded up to the patch-merge grid): a 112-px image -> 16 tokens.
        factor = 2 * patch_size
        side = -(-image_size // factor) * factor
        pixels = {"shortest_edge": factor * factor, "longest_edge": side * side}
        return getattr(transformers, processor_cls)(
            image_processor=transformers.Qwen2VLImageProcessor(size=pixels, patch_size=patch_size),
            tokenizer=tokenizer,
            video_processor=getattr(transformers, video_cls)(size=pixels, patch_size=patch_size),
            chat_template=chat_template,
        )

    return build


def _qwen_vision_ids(tokenizer) -> dict[str, int]:
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }


def _qwen2_vl_config(tokenizer, image_size: int, head_dim: int | None = None):
    from transformers import Qwen2VLConfig

    vision = {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 2,
        "num_heads": 2,
        "hidden_size": _TEXT["hidden_size"],
        "patch_size": _PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=_text_config(tokenizer, head_dim, rope_parameters=_qwen_rope(head_dim)),
        vision_config=vision,
        **_qwen_vision_ids(tokenizer),
        **_special_ids(tokenizer),
    )


def _qwen2_5_vl_config(tokenizer, image_size: int, head_dim: int | None = None):
    from transformers import Qwen2_5_VLConfig

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": _TEXT["hidden_size"],
        "patch_size": _PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # Window attention in block 0 (windows of 56 px = 2x2 merged tokens), full attention in block 1.
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, head_dim, rope_parameters=_qwen_rope(head_dim)),
        vision_config=vision,
        **_qwen_vision_ids(tokenizer),
        **_special_ids(tokenizer),
    )


# Bigger Qwen2.5-VL shapes (random weights) for benchmarks and the GPU check, with the tiny tokenizer and processor.
# "3b" is Qwen2.5-VL-3B-Instruct's config.json: text 36 x 2048 (GQA 16/2 heads, MLP 11008, vocabulary 151936, tied
# embeddings), vision 32 x 1280 blocks (window attention, full attention in 7/15/23/31). "small" is ~41M parameters.
MODEL_SIZES = ("tiny", "small", "3b")
_QWEN2_5_VL_SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any], list[int]]] = {
    "small": (
        {
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 16384,
        },
        {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "fullatt_block_indexes": [1, 3]},
        [8, 12, 12],  # head_dim 64 -> rotary half-dim 32
    ),
    "3b": (
        {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        [16, 24, 24],  # head_dim 128
    ),
}


def _qwen2_5_vl_sized_config(tokenizer, size: str):
    from transformers import Qwen2_5_VLConfig

    text, vision, mrope = (dict(part) if isinstance(part, dict) else list(part) for part in _QWEN2_5_VL_SHAPES[size])
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"size {size!r}: vocabulary {text['vocab_size']} is smaller than the tokenizer")
    text.update(
        _special_ids(tokenizer),
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
    )
    vision.update(
        out_hidden_size=text["hidden_size"],
        patch_size=_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, **_qwen_vision_ids(tokenizer), **_special_ids(tokenizer)
    )


# Qwen3-VL keeps its real 16-px patches (32-px merge grid), so images are rounded up to a multiple of 32 px.
_QWEN3_PATCH = 16


def _qwen3_vl_config(tokenizer, image_size: int, head_dim: int | None = None):
    from transformers import Qwen3VLConfig

    grid = -(-image_size // (2 * _QWEN3_PATCH)) * 2
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": _TEXT["hidden_size"],
        "patch_size": _QWEN3_PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # Learned position grid (interpolated at run time); must be a perfect square.
        "num_position_embeddings": grid * grid,
        "deepstack_visual_indexes": [0],
    }
    rope = _qwen_rope(head_dim, rope_theta=5_000_000.0, mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config=_text_config(tokenizer, _head_dim(head_dim), rope_parameters=rope),
        vision_config=vision,
        **_qwen_vision_ids(tokenizer),
        **_special_ids(tokenizer),
    )


# --- Gemma 3 ------------------------------------------------------------------------------------------------

_GEMMA3_IMAGE = ("<image_soft_token>", "<start_of_image>", "<end_of_image>")


def _gemma3_processor(tokenizer, chat_template: str, image_size: int):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=chat_template,
        image_seq_length=_tokens_per_image(image_size),
    )


def _gemma3_config(tokenizer, image_size: int, head_dim: int | None = None):
    from transformers import Gemma3Config

    image, boi, eoi = _ids(tokenizer, *_GEMMA3_IMAGE)
    text = _text_config(
        tokenizer,
        head_dim=_head_dim(head_dim),
        model_type="gemma3_text",
        query_pre_attn_scalar=_head_dim(head_dim),
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = dict(_VISION, model_type="siglip_vision_model", image_size=image_size, patch_size=_PATCH)
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        # Average-pools the (image_size / 14)^2 patch grid 2x2.
        mm_tokens_per_image=_tokens_per_image(image_size),
        image_token_index=image,
        boi_token_index=boi,
        eoi_token_index=eoi,
        **_special_ids(tokenizer),
    )


# --- Idefics3 / SmolVLM -------------------------------------------------------------------------------------

_IDEFICS_IMAGE_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Tile tags used by image splitting (the processors look up all 6x6 of them).
_ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


def _idefics_image_kwargs(image_size: int) -> dict[str, Any]:
    # No image splitting: one global image of ``image_size`` px, so the token count stays (image_size / 28)^2.
    return {
        "size": {"longest_edge": image_size},
        "max_image_size": {"longest_edge": image_size},
        "do_image_splitting": False,
    }


def _idefics3_processor(tokenizer, chat_template: str, image_size: int):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    return Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**_idefics_image_kwargs(image_size)),
        tokenizer=tokenizer,
        image_seq_len=_tokens_per_image(image_size),
        chat_template=chat_template,
    )


def _smolvlm_processor(tokenizer, chat_template: str, image_size: int):
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**_idefics_image_kwargs(image_size)),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(
            size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
        ),
        image_seq_len=_tokens_per_image(image_size),
        chat_template=chat_template,
    )


def _idefics_config(config_cls: str):
    def build(tokenizer, image_size: int, head_dim: int | None = None):
        import transformers

        (image,) = _ids(tokenizer, "<image>")
        vision = dict(_VISION, image_size=image_size, patch_size=_PATCH)
        return getattr(transformers, config_cls)(
            vision_config=vision,
            text_config=_text_config(tokenizer, head_dim, model_type="llama"),
            scale_factor=2,
            image_token_id=image,
            **_special_ids(tokenizer),
        )

    return build


# --- LLaVA / LLaVA-NeXT -------------------------------------------------------------------------------------

# TRL ships no LLaVA-1.5 template; this is a minimal one in the llava-hf style ("USER: <image>\n... ASSISTANT:").
_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ eos_token + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
# LLaVA keeps a 2x2-merge-equivalent budget by using 28-px CLIP patches: (image_size / 28)^2 tokens.
_LLAVA_PATCH = 2 * _PATCH


def _llava_pinpoints(image_size: int) -> list[list[int]]:
    return [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]


def _llava_processor(tokenizer, chat_template: str, image_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=chat_template,
    )


def _llava_next_processor(tokenizer, chat_template: str, image_size: int):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=_llava_pinpoints(image_size),
        ),
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def _llava_config(config_cls: str):
    def build(tokenizer, image_size: int, head_dim: int | None = None):
        import transformers

        (image,) = _ids(tokenizer, "<image>")
        vision = dict(
            _VISION,
            model_type="clip_vision_model",
            image_size=image_size,
            patch_size=_LLAVA_PATCH,
            projection_dim=_VISION["hidden_size"],
        )
        extra = {"image_grid_pinpoints": _llava_pinpoints(image_size)} if config_cls == "LlavaNextConfig" else {}
        return getattr(transformers, config_cls)(
            vision_config=vision,
            text_config=_text_config(tokenizer, head_dim, model_type="llama"),
            image_token_index=image,
            image_seq_length=_tokens_per_image(image_size),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            **extra,
            **_special_ids(tokenizer),
        )

    return build


_LLAMA2_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "special_tokens": ("<image>",),
    "extra_special_tokens": {"image_token": "<image>"},
}

_FAMILIES: dict[str, _Family] = {
    "qwen2_5_vl": _Family(
        chat_template="qwen2_5_vl",
        build_processor=_qwen_processor("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", _PATCH),
        build_config=_qwen2_5_vl_config,
        **_QWEN_TOKENS,
    ),
    "qwen2_vl": _Family(
        # Qwen2-VL and Qwen2.5-VL ship the same chat template; TRL stores it once.
        chat_template="qwen2_5_vl",
        build_processor=_qwen_processor("Qwen2VLProcessor", "Qwen2VLVideoProcessor", _PATCH),
        build_config=_qwen2_vl_config,
        **_QWEN_TOKENS,
    ),
    "qwen3_vl": _Family(
        chat_template="qwen3_vl",
        build_processor=_qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", _QWEN3_PATCH),
        build_config=_qwen3_vl_config,
        **_QWEN_TOKENS,
    ),
    "gemma3": _Family(
        chat_template="gemma3",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        special_tokens=("<start_of_turn>", "<end_of_turn>", *_GEMMA3_IMAGE),
        # Gemma3Processor reads these three names off the tokenizer.
        extra_special_tokens=dict(zip(("image_token", "boi_token", "eoi_token"), _GEMMA3_IMAGE, strict=True)),
        stop_tokens=("<end_of_turn>",),
        build_processor=_gemma3_processor,
        build_config=_gemma3_config,
    ),
    "idefics3": _Family(
        chat_template="idefics3",
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|finetune_right_pad_id|>",
        special_tokens=("<|end_of_text|>", *_IDEFICS_IMAGE_TOKENS.values(), *_ROW_COL_TOKENS),
        extra_special_tokens=dict(_IDEFICS_IMAGE_TOKENS),
        stop_tokens=("<|end_of_text|>",),
        build_processor=_idefics3_processor,
        build_config=_idefics_config("Idefics3Config"),
    ),
    "smolvlm": _Family(
        chat_template="smolvlm",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        special_tokens=("<|endoftext|>", "<video>", *_IDEFICS_IMAGE_TOKENS.values(), *_ROW_COL_TOKENS),
        extra_special_tokens=dict(_IDEFICS_IMAGE_TOKENS, video_token="<video>"),
        stop_tokens=("<|endoftext|>",),
        build_processor=_smolvlm_processor,
        build_config=_idefics_config("SmolVLMConfig"),
    ),
    "llava": _Family(
        chat_template=_LLAVA_CHAT_TEMPLATE,
        build_processor=_llava_processor,
        build_config=_llava_config("LlavaConfig"),
        **_LLAMA2_TOKENS,
    ),
    "llava_next": _Family(
        chat_template="llava_next",
        build_processor=_llava_next_processor,
        build_config=_llava_config("LlavaNextConfig"),
        **_LLAMA2_TOKENS,
    ),
}

TINY_VLM_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


# ---------------------------------------------------------------------------------------------------------------
# Build / cache
# ---------------------------------------------------------------------------------------------------------------


def _marker(
    family: str, seed: int, image_size: int, size: str = "tiny", dtype: str = "float32", head_dim: int | None = None
) -> dict[str, Any]:
    import transformers

    marker = {
        "family": family,
        "seed": seed,
        "image_size": image_size,
        "build_version": _BUILD_VERSION,
        "transformers": transformers.__version__,
    }
    if size != "tiny" or dtype != "float32":  # tiny fp32 markers stay as they were: existing caches remain valid
        marker.update(size=size, dtype=dtype)
    if head_dim is not None:  # default-head_dim markers stay as they were
        marker.update(head_dim=head_dim)
    return marker


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / _MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _randomize_zero_matrices(model, std: float = 0.02) -> None:
    """Re-initializes weight matrices that the family zero-initializes.

    Gemma3 starts its multimodal projector at zero, which makes a freshly built model blind: image features vanish,
    logits ignore the picture and the vision tower gets no gradient, so perception tests would pass vacuously.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not param.any():
                logger.debug("re-initializing zero matrix %s", name)
                param.normal_(0.0, std)


def _build_into(
    folder: Path,
    family: str,
    seed: int,
    image_size: int,
    size: str = "tiny",
    dtype: str = "float32",
    device: str = "cpu",
    head_dim: int | None = None,
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    spec = _FAMILIES[family]
    # A family names one of TRL's shipped templates, or carries its own jinja when TRL ships none.
    chat_template = spec.chat_template if "{" in spec.chat_template else load_trl_chat_template(spec.chat_template)
    tokenizer = build_local_tokenizer(
        spec.special_tokens,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        bos_token=spec.bos_token,
        unk_token=spec.unk_token,
        extra_special_tokens=spec.extra_special_tokens,
        chat_template=chat_template,
    )
    processor = spec.build_processor(tokenizer, chat_template, image_size)
    config = (
        spec.build_config(tokenizer, image_size, head_dim)
        if size == "tiny"
        else _qwen2_5_vl_sized_config(tokenizer, size)
    )

    torch.manual_seed(seed)
    with torch.device(device):  # initialise a 3B model on the GPU directly: minutes and 15 GB of RAM on CPU
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    _randomize_zero_matrices(model)
    model.eval()

    eos_ids = _ids(tokenizer, spec.eos_token, *spec.stop_tokens)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built tiny %s: %d params, vocab %d", family, n_params, len(tokenizer))


def build_tiny_vlm(
    family: str = "qwen2_5_vl",
    output_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    image_size: int = 112,
    overwrite: bool = False,
    size: str = "tiny",
    dtype: str = "float32",
    device: str = "cpu",
    head_dim: int | None = None,
) -> Path:
    """Builds a tiny random VLM of ``family`` into ``output_dir`` and returns the folder.

    ``size`` other than ``"tiny"`` (``MODEL_SIZES``, Qwen2.5-VL only) keeps the tiny tokenizer and processor but gives
    the model bigger shapes: ``"3b"`` is Qwen2.5-VL-3B's (random weights), for the GPU check and benchmarks; build
    it with ``device="cuda", dtype="bfloat16"``. The weights are saved in ``dtype``.
    ``head_dim`` (tiny only; default 16) re-splits the tiny text tower's hidden size 64 into ``64 // head_dim`` heads
    of ``head_dim`` (and scales Qwen's ``mrope_section`` to sum to ``head_dim // 2``): vLLM's CPU attention needs
    ``head_dim >= 32``, so vLLM-CPU tests build with ``head_dim=32``. Same parameter count.
    The folder loads with ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``.
    A marker json records the arguments; a folder already built with the same arguments is reused as-is unless
    ``overwrite=True``. The build happens in a sibling temp folder that is renamed into place, so a crash (or a
    concurrent build) never leaves a half-written model behind.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {TINY_VLM_FAMILIES}")
    if image_size < 56 or image_size % 28:
        # 14-px patches merged 2x2: other sizes would leave partial patches and mismatched token counts.
        raise ValueError(f"image_size must be a multiple of 28 and at least 56, got {image_size}")
    if size not in MODEL_SIZES or (size != "tiny" and family != "qwen2_5_vl"):
        raise ValueError(f"size must be one of {MODEL_SIZES} ('tiny' only for {family!r}), got {size!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if head_dim is not None and (size != "tiny" or head_dim < 2 or head_dim % 2 or _TEXT["hidden_size"] % head_dim):
        hidden = _TEXT["hidden_size"]
        raise ValueError(f"head_dim must be an even divisor of {hidden} (tiny size only), got {head_dim}")
    suffix = "" if size == "tiny" and dtype == "float32" else f"-{size}-{dtype}"
    if head_dim is not None:
        suffix += f"-hd{head_dim}"
    folder = (
        Path(output_dir)
        if output_dir is not None
        else default_cache_dir() / f"{family}-s{seed}-px{image_size}{suffix}"
    )
    folder = folder.expanduser().resolve()
    expected = _marker(family, seed, image_size, size, dtype, head_dim)

    if folder.exists():
        found = _read_marker(folder)
        if found == expected and not overwrite:
            logger.debug("reusing tiny %s in %s", family, folder)
            return folder
        if found is None and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and was not built by build_tiny_vlm; pass overwrite=True")

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _build_into(tmp, family, seed, image_size, size, dtype, device, head_dim)
        (tmp / _MARKER_FILE).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            if not overwrite and _read_marker(folder) == expected:
                # A concurrent build finished first; keep its folder (someone may already be reading it).
                shutil.rmtree(tmp)
                return folder
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            # A concurrent build won the race between rmtree and rename; use its folder if it matches.
            if _read_marker(folder) != expected:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tiny %s ready in %s", family, folder)
    return folder


TINY_PREFIX = "tiny:"


def resolve_model_path(model_name_or_path: str, family: str) -> str:
    """`tiny` / `tiny:<family>` → a tiny random VLM built (once, cached) on disk; anything else is returned as is."""
    if model_name_or_path == "tiny" or model_name_or_path.startswith(TINY_PREFIX):
        return str(build_tiny_vlm(family=model_name_or_path[len(TINY_PREFIX) :] or family))
    return model_name_or_path
